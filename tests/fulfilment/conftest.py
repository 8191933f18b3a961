"""What the status consumer's tests share: Redis, a pool prepared as the engine's, and a
channel on an emptied status queue (reports other tests left would arrive first); and
the steps of their scenarios, as fixtures: orders logged, reports published, rows read."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import asyncpg
import pytest
from redis.asyncio import Redis

from engine.gate.client import Gate
from engine.keys import EXCHANGE, QUEUE_STATUS, RK_STATUS
from engine.pipeline.logsink import prepare_connection, write_batch
from engine.pipeline.orders import Order


@pytest.fixture
async def env(settings):
    redis = Redis.from_url(settings.redis_url)
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=3,
                                     init=prepare_connection)
    conn = await aiormq.connect(settings.amqp_url)
    channel = await conn.channel()
    await channel.queue_purge(QUEUE_STATUS)
    yield redis, pool, channel
    await conn.close()
    await pool.close()
    await redis.aclose()


@pytest.fixture
def publish() -> Callable[[Any, bytes], Awaitable[None]]:
    """`await publish(channel, body)`: a status report, routed as the Resource Domain
    sends it."""
    async def publish(channel: Any, body: bytes) -> None:
        await channel.basic_publish(body, exchange=EXCHANGE, routing_key=RK_STATUS)

    return publish


@pytest.fixture
def log_orders() -> Callable[[asyncpg.Pool, Gate, int, list[int]], Awaitable[list[Order]]]:
    """`await log_orders(pool, gate, pid, users)`: orders bought through the real gate and
    logged as the engine logs them; instance IDs pid * 1000 + i, in the users' order."""
    async def log_orders(pool: asyncpg.Pool, gate: Gate, pid: int,
                         users: list[int]) -> list[Order]:
        orders = []
        for i, uid in enumerate(users):
            r = await gate.buy(pid, uid)
            assert r.outcome == "accepted"
            sale = (await gate.sale_state(pid)).sale_id
            orders.append(Order(pid, uid, r.stream_id, int(time.time()), sale, r.slot, b"s",
                                pid * 1000 + i))
        await write_batch(pool, orders, 10)
        return orders

    return log_orders


@pytest.fixture
def rows() -> Callable[[asyncpg.Pool, int], Awaitable[dict[int, asyncpg.Record]]]:
    """`await rows(pool, pid)`: the product's rows of seckill_logs by instance ID."""
    async def rows(pool: asyncpg.Pool, pid: int) -> dict[int, asyncpg.Record]:
        return {r["instance_id"]: r for r in await pool.fetch(
            "SELECT * FROM seckill_logs WHERE product_id = $1", pid)}

    return rows
