"""Each dependency alone, driven as hard as our client libraries can: the physical limits.

The slowest of these bounds the engine on this machine; the engine is quoted
as a share of it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.amqp.framing import PERSISTENT
from engine.amqp.publisher import CONFIRMED, ConfirmPublisher, Message
from engine.amqp.topology import CONTENT_TYPE, EXCHANGE, QUEUE_CREATED, RK_CREATED
from engine.config import Settings
from engine.keys import GROUP, Keys

from .enginerun import CpuWindow
from .env import preload, purge_queues
from .verdicts import MIN_TICKS

BODY = b"\x08\x01\x10" + b"x" * 120  # about the size of an INSTANCE_CREATED event


async def redis_drain(settings: Settings, total: int, batch: int = 500,
                      min_seconds: float = 3.0) -> dict[str, Any]:
    """XREADGROUP + XACK of a preloaded stream, one client, batches of `batch`.

    The stream is read again from its start (XGROUP SETID) until `min_seconds`
    have passed and Redis has used enough clock ticks to be measured (one client
    keeps Redis at a fraction of a core).
    """
    pid = 990_000_001
    await preload(settings, [pid], total)
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    stream = keys.stream(pid)
    done = 0
    window = _ours(settings)
    start = time.perf_counter()
    try:
        while not _long_enough(window, "redis", done, total, start, min_seconds):
            reply = await redis.xreadgroup(GROUP, "bench", {stream: ">"}, count=batch)
            if not reply or not reply[0][1]:
                await redis.xgroup_setid(stream, GROUP, id="0")
                continue
            ids = [entry_id for entry_id, _ in reply[0][1]]
            await redis.xack(stream, GROUP, *ids)
            done += len(ids)
    finally:
        await redis.aclose()
    elapsed = time.perf_counter() - start
    return {"orders": done, "seconds": elapsed, "per_second": done / elapsed,
            **window.stop(elapsed, done)}


def _long_enough(window: CpuWindow, service: str, done: int, total: int, start: float,
                 min_seconds: float, longest: float = 60.0) -> bool:
    """At least `total` orders and `min_seconds`, and the service measured over enough
    ticks (a margin above MIN_TICKS), unless `longest` has passed (then the table
    flags the short window). Ticks are read only once the rest holds."""
    elapsed = time.perf_counter() - start
    if done < total or elapsed < min_seconds:
        return False
    return elapsed >= longest or window.ticks_so_far(service) >= MIN_TICKS * 1.5


def _ours(settings: Settings) -> CpuWindow:
    """A CPU window charging this process as "workers" (the client), started now."""
    window = CpuWindow(settings, lambda: [os.getpid()])
    window.start()
    return window


async def publish_plain(settings: Settings, total: int, window: int = 500) -> dict[str, Any]:
    """aiormq's own `basic_publish`, `window` publishes in flight, confirms awaited."""
    await purge_queues(settings)
    conn = await aiormq.connect(settings.amqp_url)
    channel = await conn.channel(publisher_confirms=True)
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with sem:
            props = aiormq.spec.Basic.Properties(
                content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, message_id=str(i),
                message_type="INSTANCE_CREATED")
            await channel.basic_publish(BODY, exchange=EXCHANGE, routing_key=RK_CREATED,
                                        properties=props, mandatory=True)

    cpu = _ours(settings)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(total)))
    finally:
        await conn.close()
    elapsed = time.perf_counter() - start
    figures = cpu.stop(elapsed, total)
    await purge_queues(settings)
    return {"orders": total, "seconds": elapsed, "per_second": total / elapsed,
            "window": window, **figures}


async def publish_batched(settings: Settings, total: int, batch: int = 500,
                          inflight: int = 4) -> dict[str, Any]:
    """The engine's publisher alone: framed batches, `inflight` batches in flight."""
    await purge_queues(settings)
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED")
    await publisher.connect()
    sem = asyncio.Semaphore(inflight)
    confirmed = 0

    async def one(start: int) -> None:
        nonlocal confirmed
        async with sem:
            msgs = [Message(BODY, str(i)) for i in range(start, min(total, start + batch))]
            outcomes = await publisher.publish(msgs, 30)
            confirmed += outcomes.count(CONFIRMED)

    window = _ours(settings)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(s) for s in range(0, total, batch)))
    finally:
        await publisher.close()
    elapsed = time.perf_counter() - start
    figures = window.stop(elapsed, confirmed)
    await purge_queues(settings)
    return {"orders": confirmed, "seconds": elapsed, "per_second": confirmed / elapsed,
            "batch": batch, "inflight": inflight, **figures}


async def publish_by_queue_type(settings: Settings, total: int) -> dict[str, Any]:
    """The engine's publisher into a quorum and into a classic durable queue, side by side."""
    out = {}
    conn = await aiormq.connect(settings.amqp_url)
    try:
        channel = await conn.channel()
        for kind in ("quorum", "classic"):
            queue = f"bench-{kind}"
            await channel.queue_declare(queue, durable=True,
                                        arguments={"x-queue-type": kind})
            await channel.queue_bind(queue, EXCHANGE, routing_key=f"bench.{kind}")
            await channel.queue_purge(queue)
            publisher = ConfirmPublisher(settings, f"bench.{kind}", "INSTANCE_CREATED")
            await publisher.connect()
            start = time.perf_counter()
            try:
                for base in range(0, total, 2000):
                    batches = [[Message(BODY, str(i)) for i in range(b, min(total, b + 500))]
                               for b in range(base, min(total, base + 2000), 500)]
                    await asyncio.gather(*(publisher.publish(m, 30) for m in batches))
            finally:
                await publisher.close()
            elapsed = time.perf_counter() - start
            out[kind] = {"orders": total, "seconds": elapsed, "per_second": total / elapsed}
            await channel.queue_delete(queue)
    finally:
        await conn.close()
    return out


async def copy_rate(settings: Settings, total: int, batch: int = 500,
                    min_seconds: float = 3.0) -> dict[str, Any]:
    """Binary COPY in transactions of `batch` rows into a copy of seckill_logs (same
    indexes): at least `total` rows and `min_seconds`, for enough clock ticks."""
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_copy")
        await conn.execute("CREATE TABLE bench_copy (LIKE seckill_logs INCLUDING ALL)")
        cols = ("product_id", "user_id", "instance_id", "stream_id", "sale_id", "slot")
        done = 0
        window = _ours(settings)
        start = time.perf_counter()
        while not _long_enough(window, "postgresql", done, total, start, min_seconds):
            rows = [(1, i, i, f"{1700000000000 + i}-0", "bench", i + 1)
                    for i in range(done, done + batch)]
            async with conn.transaction():
                await conn.copy_records_to_table("bench_copy", records=rows, columns=cols)
            done += batch
        elapsed = time.perf_counter() - start
        figures = window.stop(elapsed, done)
        await conn.execute("DROP TABLE bench_copy")
    finally:
        await conn.close()
    return {"orders": done, "seconds": elapsed, "per_second": done / elapsed, **figures}


def queue_type(vhost: str) -> str:
    """The type (classic/quorum) of the queue the topology declares, as the broker says."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"],
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == QUEUE_CREATED:
            return parts[-1]
    return "unknown"
