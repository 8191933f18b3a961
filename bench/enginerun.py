"""`seckill run` as a child process, measured from the outside.

Throughput is counted from the first acknowledged order to the last, so the
workers' boot is not part of it. CPU time per order is the workers' own
user+sys time (from /proc) over the same window; RSS is each worker's peak.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from engine.config import Settings, to_env
from engine.keys import GROUP, Keys

SECKILL = str(Path(sys.executable).with_name("seckill"))
TICK = os.sysconf("SC_CLK_TCK")


def engine_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    return to_env(settings, **{"log_json": True, "log_level": "WARNING", **overrides})


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """user + sys seconds of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


# the processes of each service on this machine, by /proc/<pid>/comm
SERVICE_COMMANDS = {"rabbitmq": {"beam.smp"}, "postgresql": {"postgres"},
                    "redis": {"redis-server"}}


def service_cpu() -> dict[str, float]:
    """user + sys seconds used so far by each local service (all its processes).

    Read before and after a run, the difference says where the machine's cores
    went: the bound that stops the engine on a small machine is the CPU its
    services take, and this shows it.
    """
    used = dict.fromkeys(SERVICE_COMMANDS, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        for service, commands in SERVICE_COMMANDS.items():
            if comm in commands:
                used[service] += cpu_seconds(int(entry.name))
    return used


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class Engine:
    def __init__(self, settings: Settings, workers: int, **overrides: Any) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="seckill-bench-", suffix=".log")
        self.proc = subprocess.Popen([SECKILL, "run", "--workers", str(workers)],
                                     env=engine_env(settings, **overrides),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.worker_pids())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def acked(redis: Redis, keys: Keys, pids: list[int]) -> int:
    """Entries delivered to the group and no longer pending, over all streams."""
    pipe = redis.pipeline(transaction=False)
    for pid in pids:
        pipe.xinfo_groups(keys.stream(pid))
    total = 0
    for groups in await pipe.execute():
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                total += int(g["entries-read"] or 0) - int(g["pending"])
    return total


async def drain(settings: Settings, pids: list[int], total: int, workers: int,
                progress: Callable[[int, int], None] | None = None,
                timeout: float = 900, **overrides: Any) -> dict[str, Any]:
    """Start the engine on a preloaded backlog; measure until every order is acknowledged."""
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    engine = Engine(settings, workers, **overrides)
    try:
        deadline = time.monotonic() + timeout
        while (n := await acked(redis, keys, pids)) == 0:
            _check(engine, deadline)
            await asyncio.sleep(0.01)
        t0, n0, cpu0, svc0 = time.perf_counter(), n, engine.cpu(), service_cpu()
        rss_start = [rss_mb(p) for p in engine.worker_pids()]
        while n < total:
            _check(engine, deadline)
            await asyncio.sleep(0.05)
            n = await acked(redis, keys, pids)
            if progress:
                progress(n, total)
        t1, cpu1, svc1 = time.perf_counter(), engine.cpu(), service_cpu()
        peaks = [rss_mb(p, "VmHWM") for p in engine.worker_pids()]
        rss_end = [rss_mb(p) for p in engine.worker_pids()]
    finally:
        engine.stop()
        await redis.aclose()
    orders = n - n0
    if orders <= 0:
        raise RuntimeError("the engine finished before it could be measured: use more orders")
    return {"workers": workers, "orders": total, "seconds": t1 - t0,
            "per_second": orders / (t1 - t0), "cpu_us_per_order": (cpu1 - cpu0) / orders * 1e6,
            "peak_rss_mb": max(peaks, default=0.0), "rss_start_mb": max(rss_start, default=0.0),
            "rss_end_mb": max(rss_end, default=0.0),
            # cores busy on average during the run: the workers, then each service
            "cores_busy": {"workers": (cpu1 - cpu0) / (t1 - t0),
                           **{k: (svc1[k] - svc0[k]) / (t1 - t0) for k in svc1}}}


def _check(engine: Engine, deadline: float) -> None:
    if engine.proc.poll() is not None:
        err = Path(engine.log.name).read_text(errors="replace")
        raise RuntimeError(f"the engine exited with {engine.proc.returncode}: {err[-2000:]}")
    if time.monotonic() > deadline:
        raise RuntimeError("the engine did not finish in time")
