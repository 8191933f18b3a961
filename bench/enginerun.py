"""`seckill run` as a child process, measured from the outside.

The workers boot with the backlog out of their sight (its streams taken out of
`seckill:streams` until every worker is up and idle), so no boot lands in the window,
whatever a variant imports at boot (tracing's SDK: some 50 ms a worker) and however
far apart the workers' boots end. CPU is counted from the moment the streams are
named again, wall time from the first entry read by the group (so the half second a
worker may take to notice a new sale adds idle ticks, not seconds), both to the last
acknowledgement; the batches in flight before the first acknowledgement are in it.
An order counts as processed only when its row is committed in seckill_logs and its event
reached the tap queue (the topology's own `resource.instance-created`,
bound to the exchange; nothing consumes it in the bench vhost), matched by
instance ID after the window; dead letters are counted apart. CPU time is
read from /proc in clock ticks, for the workers and for each service, and the
tick counts are kept beside the figures. RSS is each worker's peak.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.amqp.topology import QUEUE_CREATED
from engine.config import Settings, to_env
from engine.keys import GROUP, Keys
from engine.testing.processes import SeckillProcess

from .verdicts import rate, settle

TICK = os.sysconf("SC_CLK_TCK")


def engine_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """A measured child's environment: JSON logs at WARNING, none of the harness's
    quick test timings (the figures are for the production defaults)."""
    return to_env(settings, **{"log_json": True, "log_level": "WARNING", **overrides})


def cpu_ticks(pid: int) -> int:
    """user + sys clock ticks of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])


_LIBC = ctypes.CDLL(None, use_errno=True)


def cpu_ns(pid: int) -> int:
    """user + sys nanoseconds of one process (0 once it is gone): the kernel's own count,
    which /proc's ticks truncate. A window of some 70 ticks, one side of a drain, was
    off by up to a tick at each end, 1-3%: as large as the cost of a few percent a
    side-by-side drain is there to see (bench/sidebyside.py)."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return 0
    try:
        return time.clock_gettime_ns(clock.value)
    except OSError:  # (gone since)
        return 0


def cpu_seconds(pid: int) -> float:
    """user + sys seconds of one process."""
    return cpu_ticks(pid) / TICK


# the commands of each service's processes, by /proc/<pid>/comm
SERVICE_COMMANDS = {"rabbitmq": {"beam.smp"}, "postgresql": {"postgres"},
                    "redis": {"redis-server"}}
DEFAULT_PORTS = {"rabbitmq": 5672, "postgresql": 5432, "redis": 6379}


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (comm, parent pid) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            out[int(entry.name)] = (comm, int(stat.rsplit(")", 1)[1].split()[1]))
    return out


def tcp_rows() -> Iterator[list[str]]:
    """The fields of every row of this machine's TCP tables (IPv4 and IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (none if it is gone)."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def _listening_inodes(port: int) -> set[int]:
    return {int(cols[9]) for cols in tcp_rows()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port}


def service_ports(settings: Settings) -> dict[str, int]:
    urls = {"rabbitmq": settings.amqp_url, "postgresql": settings.pg_dsn,
            "redis": settings.redis_url}
    return {svc: urlsplit(url).port or DEFAULT_PORTS[svc] for svc, url in urls.items()}


def service_roots(settings: Settings) -> dict[str, int]:
    """The process listening on each service's port, as `settings` reaches it.

    Only these (and their children: PostgreSQL's backends, RabbitMQ's helpers) are
    the services the bench measures; a test suite's private Redis or RabbitMQ node,
    or the Erlang VM of a `rabbitmqctl` call, must not be charged to them. A service
    with no such process here is an error, not a zero: a zero would make it look free.
    """
    procs = _processes()
    roots = {}
    for svc, port in service_ports(settings).items():
        inodes = _listening_inodes(port)
        owner = next((pid for pid, (comm, _) in procs.items()
                      if comm in SERVICE_COMMANDS[svc] and inodes & socket_inodes(pid)), None)
        if owner is None:
            raise RuntimeError(f"no {svc} process listening on port {port} on this machine: "
                               "its CPU cannot be measured")
        roots[svc] = owner
    return roots


def service_ticks(roots: dict[str, int]) -> dict[str, dict[int, int]]:
    """Clock ticks so far of each service's processes: pid -> ticks, root and descendants."""
    procs = _processes()
    children_of: dict[int, list[int]] = {}
    for pid, (_, ppid) in procs.items():
        children_of.setdefault(ppid, []).append(pid)
    out = {}
    for svc, root in roots.items():
        pids, todo = [], [root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children_of.get(pid, []))
        out[svc] = {pid: cpu_ticks(pid) for pid in pids}
    return out


def ticks_between(start: dict[int, int], end: dict[int, int]) -> int:
    """Ticks used between two readings of a set of processes: a process born in between
    counts in full, one gone by the end counts nothing (its last ticks are unknown);
    never negative, as a sum over whatever processes exist at each end could be."""
    return sum(max(0, t - start.get(pid, 0)) for pid, t in end.items())


def machine_ticks() -> int:
    """Busy clock ticks of the whole machine so far, all cores (/proc/stat: user, nice,
    system, irq, softirq, steal; not idle or iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def service_cpu(settings: Settings) -> dict[str, float]:
    """user + sys seconds used so far by each service's processes."""
    return {svc: sum(t.values()) / TICK
            for svc, t in service_ticks(service_roots(settings)).items()}


class CpuWindow:
    """CPU ticks of our own processes and of each service between start() and stop().

    `ours` names the processes charged as "workers" (the engine's workers, or the
    bench process itself in a ceiling phase).
    """

    def __init__(self, settings: Settings, ours: Callable[[], list[int]]) -> None:
        self.ours = ours
        self.roots = service_roots(settings)
        self.t0 = 0.0
        self.start_services: dict[str, dict[int, int]] = {}
        self.start_ours: dict[int, int] = {}
        self.start_machine = 0
        self.checked: dict[str, tuple[float, int]] = {}  # service -> (when, ticks)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.start_ours = {p: cpu_ticks(p) for p in self.ours()}
        self.start_services = service_ticks(self.roots)
        self.start_machine = machine_ticks()

    def ticks_so_far(self, service: str) -> int:
        """Ticks one service has used since start(): a ceiling phase runs until its
        service has used enough of them to be measured (verdicts.MIN_TICKS). Read
        from /proc at most every half second, so a tight loop asking does not slow."""
        now = time.perf_counter()
        if now - self.checked.get(service, (0.0, 0))[0] >= 0.5:
            ticks = ticks_between(self.start_services[service],
                                  service_ticks({service: self.roots[service]})[service])
            self.checked[service] = (now, ticks)
        return self.checked[service][1]

    def stop(self, seconds: float | None = None, orders: int = 0) -> dict[str, Any]:
        """Ticks, busy cores and (given `orders`) CPU microseconds per order, by group;
        `seconds` overrides the wall time since start() as the window."""
        end = service_ticks(self.roots)
        ours = ticks_between(self.start_ours, {p: cpu_ticks(p) for p in self.ours()})
        elapsed = time.perf_counter() - self.t0 if seconds is None else seconds
        ticks = {"workers": ours,
                 **{k: ticks_between(self.start_services[k], end[k]) for k in end}}
        # whatever else ran on the machine meanwhile (on a shared box: other people's work)
        ticks["other"] = max(0, machine_ticks() - self.start_machine - sum(ticks.values()))
        out: dict[str, Any] = {"ticks": ticks, "tick_hz": TICK,
                               "cores_busy": {k: v / TICK / elapsed for k, v in ticks.items()}}
        if orders:
            out["cpu_us"] = {k: v / TICK / orders * 1e6 for k, v in ticks.items()}
        return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class Engine:
    """`seckill run` measured: its workers' CPU; its log removed once it stopped."""

    def __init__(self, settings: Settings, workers: int, **overrides: Any) -> None:
        self.process = SeckillProcess(["run", "--workers", str(workers)],
                                      engine_env(settings, **overrides), "bench-engine")
        self.proc = self.process.proc
        self.workers = workers

    def worker_pids(self) -> list[int]:
        return self.process.children()

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.worker_pids())

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop(60)
        self.process.log_path.unlink(missing_ok=True)


async def group_counts(redis: Redis, keys: Keys, pids: list[int]) -> tuple[int, int]:
    """(entries read, entries acknowledged) by the group, over all streams."""
    pipe = redis.pipeline(transaction=False)
    for pid in pids:
        pipe.xinfo_groups(keys.stream(pid))
    read = done = 0
    for groups in await pipe.execute():
        for g in groups:
            if g["name"] in (GROUP, GROUP.encode()):
                read += int(g["entries-read"] or 0)
                done += int(g["entries-read"] or 0) - int(g["pending"])
    return read, done


async def acked(redis: Redis, keys: Keys, pids: list[int]) -> int:
    """Entries delivered to the group and no longer pending, over all streams."""
    return (await group_counts(redis, keys, pids))[1]


async def dead_letters(redis: Redis, keys: Keys, pids: list[int]) -> int:
    pipe = redis.pipeline(transaction=False)
    for pid in pids:
        pipe.xlen(keys.dlq(pid))
    return sum(await pipe.execute())


async def logged_ids(settings: Settings, pids: list[int]) -> set[int]:
    """Instance IDs of the committed rows of these products."""
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        rows = await conn.fetch("SELECT instance_id FROM seckill_logs WHERE product_id = ANY($1)",
                                pids)
    finally:
        await conn.close()
    return {r[0] for r in rows}


async def tap_ids(settings: Settings, queue: str = QUEUE_CREATED, idle: float = 3.0,
                  progress: Callable[[int, int], None] | None = None) -> set[int]:
    """Instance IDs (message_id) of the events waiting on the tap queue, consumed.

    The queue is the topology's own, bound to the exchange by `seckill migrate`:
    what reached it is what a Resource Domain would receive. Reading it empties
    it, which the next phase needs anyway.
    """
    conn = await aiormq.connect(settings.amqp_url)
    seen: set[int] = set()
    try:
        channel = await conn.channel()
        waiting = (await channel.queue_declare(queue, passive=True)).message_count or 0
        got = asyncio.Event()
        count = 0

        def on_message(message: Any) -> None:
            nonlocal count
            count += 1
            seen.add(int(message.header.properties.message_id))
            got.set()

        await channel.basic_consume(queue, on_message, no_ack=True)
        shown = time.monotonic()
        while count < waiting:
            got.clear()
            try:
                await asyncio.wait_for(got.wait(), idle)
            except TimeoutError:
                break
            if progress and (count >= waiting or time.monotonic() - shown >= 2):
                shown = time.monotonic()
                progress(count, waiting)
    finally:
        await conn.close()
    return seen


async def drain(settings: Settings, pids: list[int], total: int, workers: int,
                progress: Callable[[int, int], None] | None = None,
                timeout: float | None = None, tap: str = QUEUE_CREATED,
                **overrides: Any) -> dict[str, Any]:
    """Start the engine on a preloaded backlog; measure from its first read until every
    order is acknowledged, then count what was processed (row, and event on `tap`).

    A timeout or an engine that exits does not raise: the run comes back with
    `failed` set, so the table shows it and no target counts it.
    """
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    timeout = timeout if timeout is not None else 60 + total / 2000
    await redis.srem(keys.streams, *pids)  # (named again once every worker booted)
    engine = Engine(settings, workers, **overrides)
    out: dict[str, Any] = {"workers": workers, "orders": total, "timeout_s": timeout}
    failed: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        window = CpuWindow(settings, engine.worker_pids)  # finds the services: not in t0
        await booted(engine, deadline)
        window.start()
        await redis.sadd(keys.streams, *pids)
        while (await group_counts(redis, keys, pids))[0] == 0:
            if problem := _problem(engine, deadline):
                raise _PhaseFailed(problem)
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        rss_start = [rss_mb(p) for p in engine.worker_pids()]
        n = 0
        while n < total:
            if problem := _problem(engine, deadline):
                failed.append(f"{problem}: {n:,} of {total:,} acknowledged")
                break
            await asyncio.sleep(poll_interval(len(pids), n, total))
            n = await acked(redis, keys, pids)
            if progress:
                progress(n, total)
        t1 = time.perf_counter()
        cpu = window.stop(seconds=t1 - t0)
        out.update(peak_rss_mb=max((rss_mb(p, "VmHWM") for p in engine.worker_pids()),
                                   default=0.0),
                   rss_start_mb=max(rss_start, default=0.0),
                   rss_end_mb=max((rss_mb(p) for p in engine.worker_pids()), default=0.0))
        dead = await dead_letters(redis, keys, pids)
    except _PhaseFailed as exc:
        return {**out, "failed": str(exc)}
    finally:
        engine.stop()
        await redis.aclose()
    events = await tap_ids(settings, tap, progress=_tap_progress if progress else None)
    settled = settle(total, await logged_ids(settings, pids), events, dead, n)
    if progress:
        print(f"    counted: {settled['processed']:,} orders with a row and an event, "
              f"{dead:,} dead letters", flush=True)
    if settled.get("failed"):
        failed.append(settled.pop("failed"))
    processed = settled["processed"]
    out.update(settled, seconds=t1 - t0, **cpu,
               per_second=rate(processed, t0, t1) if processed else 0.0,
               cpu_us_per_order=cpu["ticks"]["workers"] / TICK / processed * 1e6
               if processed else 0.0)
    if processed:
        out["cpu_us"] = {k: v / TICK / processed * 1e6 for k, v in cpu["ticks"].items()}
    if failed:
        out["failed"] = "; ".join(failed)
    return out


async def booted(engine: Engine, deadline: float, quiet: float = 0.3) -> None:
    """Until every worker of `engine` has booted and is idle: all of them running, their
    CPU ticks unchanged (but for one) over `quiet` seconds. `_PhaseFailed` if the engine
    exits or the deadline passes first."""
    last: dict[int, int] | None = None
    while True:
        if problem := _problem(engine, deadline):
            raise _PhaseFailed(f"{problem} (booting)")
        await asyncio.sleep(quiet)
        now = {p: cpu_ticks(p) for p in engine.worker_pids()}
        if (last is not None and len(now) == engine.workers and now.keys() == last.keys()
                and sum(now.values()) - sum(last.values()) <= 1):
            return
        last = now


def _tap_progress(done: int, total: int) -> None:
    print(f"    tap queue read: {done:,}/{total:,} events", flush=True)


def poll_interval(streams: int, done: int, total: int) -> float:
    """How long to wait before asking Redis again how many orders are acknowledged.

    One XINFO per stream per poll: with 1,000 open sales a 50 ms poll is 20,000
    commands a second taken from the cores being measured. So many streams are
    polled every half second until the end is near (90%), then every 50 ms, which
    is the precision of the window's end.
    """
    if streams <= 10 or done >= 0.9 * total:
        return 0.05
    return 0.5


class _PhaseFailed(Exception):
    """The phase cannot be measured; the message says why."""


def _problem(engine: Engine, deadline: float) -> str | None:
    if engine.proc.poll() is not None:
        err = engine.output()
        return f"the engine exited with {engine.proc.returncode}: {err[-500:]}"
    if time.monotonic() > deadline:
        return "drain timed out"
    return None
