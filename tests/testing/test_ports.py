"""Free ports for the servers the harness starts, and whether a port answers."""

from __future__ import annotations

import socket

from engine.testing.ports import HOST, RESERVED_PORTS, free_port, port_open


def test_a_free_port_can_be_bound_and_is_never_a_shared_services():
    for _ in range(50):
        port = free_port()
        assert port not in RESERVED_PORTS
        with socket.socket() as s:
            s.bind((HOST, port))


def test_port_open_sees_a_listener_come_and_go():
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_open(port)
    assert not port_open(port)


def test_a_reserved_port_the_kernel_offers_is_passed_over(monkeypatch):
    offers = iter([6379, 5672])  # Redis's and RabbitMQ's: the shared services may take them

    class Offering(socket.socket):
        def getsockname(self):
            port = next(offers, None)
            return (HOST, port) if port else super().getsockname()

    monkeypatch.setattr(socket, "socket", Offering)
    port = free_port()
    assert port not in RESERVED_PORTS and next(offers, None) is None
