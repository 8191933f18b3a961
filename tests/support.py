"""Helpers for tests that run the real engine against the real services: orders
pushed and sales announced as the gate would, and what a run left in PostgreSQL and
Redis. The pieces the bench and the load test share (processes, taps, waits, ports,
the invariant checker) are in engine.testing."""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import GROUP, Keys
from engine.pipeline.orderrows import write_batch
from engine.pipeline.orders import Order
from engine.products import gpu_product, upsert_products
from engine.testing.processes import EngineProcess


async def purge_queues(amqp_url: str, *queues: str) -> None:
    """Empty queues of the session's vhost: what other tests' processes left there
    is not the next test's to consume."""
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        for queue in queues:
            await channel.queue_purge(queue)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def table_locked(dsn: str, table: str, mode: str = "EXCLUSIVE") -> AsyncIterator[None]:
    """Hold a PostgreSQL table lock, so whoever needs the table waits (a stuck database)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN {mode} MODE")
            yield
    finally:
        await conn.close()


async def push_orders(redis: Redis, keys: Keys, pid: int, users: range | list[int],
                      sale: str | None = "sale-1", first_slot: int = 1) -> list[str]:
    """XADD orders as the gate would write them (uid, ts, sale, slot), pipelined."""
    ids: list[str] = []
    now = str(int(time.time()))
    users = list(users)
    for start in range(0, len(users), 5000):
        pipe = redis.pipeline(transaction=False)
        for i, uid in enumerate(users[start:start + 5000], start):
            fields = {"uid": str(uid), "ts": now}
            if sale is not None:
                fields.update(sale=sale, slot=str(first_slot + i))
            pipe.xadd(keys.stream(pid), fields)
        ids += [x.decode() if isinstance(x, bytes) else x for x in await pipe.execute()]
    return ids


async def announce(redis: Redis, keys: Keys, pid: int) -> None:
    """What `sale open` does for the engine: group from 0, stream registered."""
    try:
        await redis.xgroup_create(keys.stream(pid), GROUP, id="0", mkstream=True)
    except Exception as exc:  # noqa: BLE001
        if "BUSYGROUP" not in str(exc):
            raise
    await redis.sadd(keys.streams, pid)


async def open_sales(settings: Settings, redis: Any, keys: Keys, pids: list[int]) -> None:
    """The products in the catalog and their sales announced to the engine."""
    await add_products(settings, pids)
    for pid in pids:
        await announce(redis, keys, pid)


async def add_products(settings: Settings, pids: list[int]) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await upsert_products(conn, [gpu_product(pid) for pid in pids])
    finally:
        await conn.close()


async def pg_fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """One query on a connection of its own (closed after it)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def log_rows(settings: Settings, pids: list[int]) -> list[asyncpg.Record]:
    return await pg_fetch(
        settings.pg_dsn, "SELECT product_id, user_id, instance_id, stream_id, sale_id, slot,"
        " status FROM seckill_logs WHERE product_id = ANY($1::bigint[])", pids)


async def pending_count(redis: Redis, keys: Keys, pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            info = await redis.xpending(keys.stream(pid), GROUP)
        except Exception:  # noqa: BLE001 - no group yet
            continue
        total += info["pending"]
    return total


async def row_count(settings, pids) -> int:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM seckill_logs WHERE product_id = ANY($1::bigint[])", pids)
    finally:
        await conn.close()


async def all_done(settings, redis, keys, pids, total) -> bool:
    return (await row_count(settings, pids) == total
            and await pending_count(redis, keys, pids) == 0)


async def rows_at_least(settings, pids, n) -> bool:
    return await row_count(settings, pids) >= n


async def workers_are(engine: EngineProcess, n: int) -> bool:
    return len(engine.children()) == n



def established_tcp() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, bytes sent and not yet acknowledged, bytes received and
    not yet read) of each ESTABLISHED TCP socket of this host, as the kernel lists them:
    what a test waits on to know that a server has read what a client sent, or that a
    reset has ended a connection."""
    found = []
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            _, local, remote, state, queues, *_ = line.split()
            if state == "01":  # TCP_ESTABLISHED
                unacked, unread = (int(n, 16) for n in queues.split(":"))
                found.append((int(local.rsplit(":", 1)[1], 16),
                               int(remote.rsplit(":", 1)[1], 16), unacked, unread))
    return found


async def sold_out_sale(pool, gate: Gate, pid: int) -> list[Order]:
    """A sale of 2 units bought by users 1 and 2, both orders logged as the engine logs."""
    await gate.open_sale(pid, 2)
    sale = (await gate.sale_state(pid)).sale_id
    orders = []
    for i, uid in enumerate((1, 2)):
        r = await gate.buy(pid, uid)
        assert r.outcome == "accepted"
        orders.append(Order(pid, uid, r.stream_id, int(time.time()), sale, r.slot, b"s",
                            pid * 1000 + i))
    await write_batch(pool, orders, 10)
    assert (await gate.buy(pid, 3)).outcome == "sold_out"
    return orders


def judged_doc(results: dict[str, Any], mode: str = "full") -> dict[str, Any]:
    """A bench result document around `results`, with the targets the report judges."""
    from bench.report import targets

    doc = {"mode": mode, "rounds": 3, "seconds": 60.0, "results": results,
           "machine": {"cores": 2, "cpu_model": "x", "memory_gb": 1, "python": "3.11",
                       "redis": "7", "rabbitmq": "3", "postgresql": "15"}}
    doc["targets"] = targets(doc)
    return doc


def target_named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The judged target whose name starts with `name`."""
    return next(t for t in doc["targets"] if t["target"].startswith(name))


def count_commands(redis: Redis) -> Counter[str]:
    """Count, by name, the commands `redis` sends from now on, alone or in a pipeline,
    and under "round trips" how many times it waited for Redis (once per command sent
    alone, once per pipeline): what a task under test asks of Redis, whatever else runs
    on the server at the same time."""
    sent: Counter[str] = Counter()
    send, make_pipeline = redis.execute_command, redis.pipeline

    async def counted(*args: Any, **options: Any) -> Any:
        sent[str(args[0]).upper()] += 1
        sent["round trips"] += 1
        return await send(*args, **options)

    def pipeline(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        queue, execute = pipe.execute_command, pipe.execute

        def queued(*args: Any, **options: Any) -> Any:
            sent[str(args[0]).upper()] += 1
            return queue(*args, **options)

        async def executed(*args: Any, **options: Any) -> Any:
            sent["round trips"] += 1
            return await execute(*args, **options)
        pipe.execute_command, pipe.execute = queued, executed
        return pipe
    redis.execute_command = counted  # type: ignore[method-assign]
    redis.pipeline = pipeline  # type: ignore[method-assign]
    return sent


def on_several_masters(cluster: Any, keys: Keys, ids: list[int]) -> list[int]:
    """`ids` with the last replaced until their streams live on more than one master:
    random IDs all hash to one master of three now and then (4 IDs: 1 in 27), and a
    test that checks what happens across masters would then check nothing."""
    ids = list(ids)
    while len({cluster.get_node_from_key(keys.stream(pid)).name for pid in ids}) < 2:
        ids[-1] = random.choice([pid for pid in random.sample(range(10**9, 9 * 10**9), 4)
                                 if pid not in ids])
    return ids
