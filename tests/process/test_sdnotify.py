"""The supervisor speaks systemd's notify protocol: we play the socket."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess

import pytest

from engine.errors import WaitTimedOut
from engine.testing.processes import SECKILL, engine_env
from engine.testing.waits import wait_until

pytestmark = pytest.mark.timeout(90)


def test_ready_watchdog_and_stopping(settings, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    env = engine_env(settings)
    env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
    proc = subprocess.Popen([SECKILL, "run", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[str] = []

    def received(line: str, timeout: float) -> None:
        def arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                while True:
                    seen.extend(sock.recv(4096).decode().splitlines())
            return line in seen

        try:
            wait_until(arrived, timeout, line, interval=0.05)
        except WaitTimedOut as exc:
            raise AssertionError(f"{line} not received; got {seen}") from exc

    try:
        received("READY=1", 20)
        assert f"MAINPID={proc.pid}" in seen
        received("WATCHDOG=1", 10)
        proc.send_signal(signal.SIGTERM)
        received("STOPPING=1", 10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
