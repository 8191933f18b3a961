"""The benchmark's own corner of the services, and the facts about the machine.

The suite runs beside a demo or a test run: it has its own database, vhost
and key prefix, so numbers are not polluted by (and do not pollute) anything
else, and it can wipe them freely between phases.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.amqp.topology import QUEUE_CREATED
from engine.config import Settings, load_settings
from engine.keys import GROUP, Keys
from engine.products import gpu_product, upsert_products
from engine.tracing import STREAM_FIELD

from .enginerun import TICK, service_roots, service_ticks, ticks_between

DB_NAME = "seckill_bench"
VHOST = "seckill-bench"
PREFIX = "bench:"


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def bench_settings() -> Settings:
    base = load_settings(env={k: v for k, v in os.environ.items()
                              if k in ("SECKILL_REDIS_URL", "SECKILL_AMQP_URL",
                                       "SECKILL_PG_DSN")})
    return base.replace(pg_dsn=_with_path(base.pg_dsn, "/" + DB_NAME),
                        amqp_url=_with_path(base.amqp_url, "/" + quote(VHOST, safe="")),
                        key_prefix=PREFIX, metrics_port=0, log_json=True, log_level="WARNING")


# Every benchmark of this machine wipes the same corner between its phases (the
# database, the vhost, the key prefix), so two at once break each other's
# invariants: held from prepare() to the process's exit, by whichever checkout.
LOCK_PATH = os.path.join(tempfile.gettempdir(), "seckill-bench.lock")
_held: list[int] = []


def hold_bench_lock(path: str = LOCK_PATH, report_every: float = 10.0) -> None:
    """Wait, saying so, until no other benchmark on this machine holds the lock."""
    if _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if waited % report_every == 0:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                print(f"bench: waiting for another benchmark to finish ({holder or path}):"
                      f" they share the database {DB_NAME}, the vhost {VHOST} and the"
                      f" key prefix {PREFIX!r} ({waited:.0f} s so far)", flush=True)
            time.sleep(1.0)
            waited += 1.0
    os.ftruncate(fd, 0)
    command = " ".join(sys.argv)[:150]
    os.pwrite(fd, f"pid {os.getpid()}: {command}".encode(), 0)
    _held.append(fd)


def prepare(settings: Settings) -> None:
    """Database migrated, vhost with the topology: idempotent. Holds the machine's
    benchmark lock first (hold_bench_lock)."""
    hold_bench_lock()
    from engine.admin.brokerusers import ensure_broker_users
    from engine.admin.migrate import apply_migrations, declare_topology

    apply_migrations(settings.pg_dsn)
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", "add_vhost", VHOST], capture_output=True, timeout=60)
    user = urlsplit(settings.amqp_url).username or "guest"
    subprocess.run([ctl, "-q", "set_permissions", "-p", VHOST, user, ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    asyncio.run(declare_topology(settings.amqp_url))
    ensure_broker_users(settings)


async def reset(settings: Settings, pids: list[int], quiet_wait: float = 30.0) -> None:
    """Empty the log, the streams and the queues between phases."""
    redis = Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=PREFIX + "*", count=5000)]
        for i in range(0, len(keys), 1000):
            await redis.delete(*keys[i:i + 1000])
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await conn.execute("TRUNCATE seckill_logs")
        await upsert_products(conn, [gpu_product(pid) for pid in pids])
    finally:
        await conn.close()
    await purge_queues(settings)
    await quiesce(settings, longest=quiet_wait)


async def quiesce(settings: Settings, idle_cores: float = 0.15, longest: float = 30.0) -> float:
    """Wait until the services are (nearly) idle; the seconds it took.

    Purging a quorum queue of the last phase's 200,000 events, vacuuming, writing
    checkpoints: a service can stay busy for many seconds after a phase ends, and a
    latency window opened then measures that work, not the engine. On a machine
    shared with other work they may never be idle: after `longest` the phase starts
    anyway, and says so.
    """
    roots = service_roots(settings)
    start = time.monotonic()
    while time.monotonic() - start < longest:
        before = service_ticks(roots)
        await asyncio.sleep(1.0)
        after = service_ticks(roots)
        busy = sum(ticks_between(before[s], after[s]) for s in after) / TICK
        if busy < idle_cores:
            return time.monotonic() - start
    print(f"    (services still busy after {longest:.0f} s: other load on this machine)",
          flush=True)
    return time.monotonic() - start


async def purge_queues(settings: Settings, *extra: str) -> None:
    conn = await aiormq.connect(settings.amqp_url)
    try:
        channel = await conn.channel()
        for queue in (QUEUE_CREATED, *extra):
            try:
                await channel.queue_purge(queue)
            except aiormq.exceptions.ChannelNotFoundEntity:
                channel = await conn.channel()
    finally:
        await conn.close()


async def preload(settings: Settings, pids: list[int], total: int,
                  progress: Any = None, traced: float = 0.0) -> None:
    """`total` orders spread evenly over the products' streams, groups created; a share
    `traced` of them (evenly spaced) carry a sampled trace context, as the gate writes
    it for an order the BFF traced (bench/tracebench.py)."""
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    now = str(int(time.time()))
    every = round(1 / traced) if traced > 0 else 0
    try:
        for pid in pids:
            await redis.xgroup_create(keys.stream(pid), GROUP, id="0", mkstream=True)
        await redis.sadd(keys.streams, *pids)
        done = 0
        while done < total:
            pipe = redis.pipeline(transaction=False)
            for i in range(done, min(total, done + 10_000)):
                pid = pids[i % len(pids)]
                fields = {"uid": str(i + 1), "ts": now, "sale": "bench",
                          "slot": str(i // len(pids) + 1)}
                if every and i % every == 0:
                    trace, span = random.getrandbits(128) | 1, random.getrandbits(64) | 1
                    fields[STREAM_FIELD.decode()] = f"00-{trace:032x}-{span:016x}-01"
                pipe.xadd(keys.stream(pid), fields)
            await pipe.execute()
            done = min(total, done + 10_000)
            if progress:
                progress(done, total)
    finally:
        await redis.aclose()


@dataclass(frozen=True)
class Machine:
    host: str
    cpu_model: str
    cores: int
    memory_gb: float
    python: str
    redis: str
    rabbitmq: str
    postgresql: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def machine(settings: Settings) -> Machine:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Machine(socket.gethostname(), cpu, os.cpu_count() or 1, round(mem, 1),
                   platform.python_version(), *asyncio.run(_versions(settings)))


async def _versions(settings: Settings) -> tuple[str, str, str]:
    redis = Redis.from_url(settings.redis_url)
    try:
        rv = (await redis.info("server"))["redis_version"]
    finally:
        await redis.aclose()
    conn = await aiormq.connect(settings.amqp_url)
    try:
        props = conn.server_properties
        mq = props.get("version", b"?")
        mq = mq.decode() if isinstance(mq, bytes) else str(mq)
    finally:
        await conn.close()
    pg = await asyncpg.connect(settings.pg_dsn)
    try:
        pv = await pg.fetchval("SHOW server_version")
    finally:
        await pg.close()
    return rv, mq, pv
