"""The supervisor speaks systemd's notify protocol: we play the socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from engine.testing.processes import SECKILL, engine_env

pytestmark = pytest.mark.timeout(90)


def test_ready_watchdog_and_stopping(settings, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    env = engine_env(settings)
    env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
    proc = subprocess.Popen([SECKILL, "run", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[str] = []

    def wait_for(line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in seen and time.monotonic() < deadline:
            try:
                seen.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
        assert line in seen, f"{line} not received; got {seen}"

    try:
        wait_for("READY=1", 20)
        assert f"MAINPID={proc.pid}" in seen
        wait_for("WATCHDOG=1", 10)
        proc.send_signal(signal.SIGTERM)
        wait_for("STOPPING=1", 10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
