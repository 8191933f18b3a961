"""`seckill bff`, the HTTP gate, as a child process on ports of its own.

`Bff(settings, **overrides)` returns once the server answers /healthz, so a test
or a fault can send its first request at once; `stop()` ends it and every worker
it forked (it runs in a session of its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from engine.config import Settings
from engine.errors import ChildFailed
from engine.testing.ports import HOST, free_port
from engine.testing.processes import SeckillProcess, engine_env

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def wait_healthy(url: str, timeout: float = START_TIMEOUT,
                 process: SeckillProcess | None = None) -> None:
    """Block until `url`/healthz answers 200; ChildFailed, with the output of `process`
    (the server, if we started it) when it exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url.rstrip("/") + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        exited = process is not None and not process.alive()
        if exited or time.monotonic() > deadline:
            said = f":\n{process.output()[-2000:]}" if process is not None else ""
            why = "exited" if exited else f"did not answer within {timeout:g} s"
            raise ChildFailed(f"the BFF at {url} {why}{said}")
        time.sleep(0.1)


class Bff:
    """One `seckill bff` on a free port, with its admin port on another.

    `env` makes the child's environment from `settings` and the overrides: the
    harness's quick settings by default; the benchmark passes its own.
    """

    def __init__(self, settings: Settings, *, workers: int = 1,
                 env: Callable[..., dict[str, str]] = engine_env,
                 timeout: float = START_TIMEOUT, **overrides: Any) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.admin_url = f"http://{HOST}:{self.admin_port}"
        environment = env(settings, **{"bff_admin_port": self.admin_port, **overrides})
        self.process = SeckillProcess(
            ["bff", "--port", str(self.port), "--workers", str(workers)], environment, "bff",
            session=True)
        try:
            wait_healthy(self.url, timeout, self.process)
        except ChildFailed:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.process.stop(timeout)
