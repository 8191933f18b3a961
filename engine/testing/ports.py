"""TCP ports on this machine: a free one for a server we start, and whether one answers."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"

# ports a shared service or a control command may take at any moment: epmd, the shared
# node's AMQP and distribution ports, rabbitmqctl's own distribution ports
RESERVED_PORTS = frozenset({4369, 5432, 5672, 6379, 15672, 25672, *range(35672, 35683)})


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice), none reserved."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on `port` of this machine."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False
