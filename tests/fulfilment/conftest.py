"""What the status consumer's tests share: Redis, a pool prepared as the engine's, and a
channel on an emptied status queue (reports other tests left would arrive first)."""

from __future__ import annotations

import aiormq
import asyncpg
import pytest
from redis.asyncio import Redis

from engine.keys import QUEUE_STATUS
from engine.pipeline.orderrows import prepare_connection


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
