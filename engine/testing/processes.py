"""A `seckill` command as a child process, watched from the outside.

Its output goes to a file (read for a post-mortem, or for the lines a test waits
for); `children()` reads the supervisor's workers from /proc. A child started in a
session of its own (`session=True`) can be killed together with every process it
forked, as a machine that loses power would: the chaos suite's "kill the host".
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.config import Settings, to_env

SECKILL = str(Path(sys.executable).with_name("seckill"))

# a child engine notices and recovers in seconds: the defaults are for production
QUICK: dict[str, Any] = {"metrics_port": 0, "log_json": False, "janitor_interval": 1.0,
                         "graceful_timeout": 15, "heartbeat_timeout": 10,
                         "boot_timeout": 10, "discovery_interval": 0.2}


def engine_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """Environment that points a `seckill` child at `settings` (its services and key
    prefix), with the QUICK timings unless `overrides` say otherwise."""
    return to_env(settings, **{**QUICK, **overrides})


def pid_alive(pid: int) -> bool:
    """True while any thread of `pid` is not a zombie: a killed multi-threaded server
    (beam.smp) shows a zombie leader while its other threads still hold its sockets."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):  # exited as we read
            continue
        if state != "Z":
            return True
    return False


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a supervisor's workers); none once it is gone."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class SeckillProcess:
    """`seckill <args>` as a child process, its output in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], name: str = "seckill", *,
                 log_path: Path | None = None, session: bool = False) -> None:
        self.name = name
        self.session = session
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"seckill-{name}-", suffix=".log")
            os.close(fd)
            log_path = Path(path)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([SECKILL, *args], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        return children(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def booted(self, workers: int) -> bool:
        """True once `workers` workers run and each has logged that it booted."""
        return (len(self.children()) == workers
                and self.output().count(" booted as ") >= workers)

    def kill_all(self) -> None:
        """SIGKILL the process and every process of its session at once."""
        if not self.session:
            raise ValueError(f"{self.name} was not started in a session of its own")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (an engine drains), SIGKILL if it does not exit in time; in a session
        of its own, whatever of the session is left too (a worker orphaned by a fault
        must not outlive its fault)."""
        if not self.session:
            stop_process(self.proc, timeout)
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class EngineProcess(SeckillProcess):
    """`seckill run --workers N` with the test's settings (engine_env)."""

    def __init__(self, settings: Settings, workers: int = 2, **overrides: Any) -> None:
        super().__init__(["run", "--workers", str(workers)],
                         engine_env(settings, **overrides), "engine")
