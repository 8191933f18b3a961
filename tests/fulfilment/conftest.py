"""What the status consumer's tests share: Redis, a pool prepared as the engine's, and a
bus on an emptied status queue (reports other tests left would arrive first)."""

from __future__ import annotations

import aiormq
import asyncpg
import pytest
from redis.asyncio import Redis

from engine.amqp.logins import RESOURCE_DOMAIN, login
from engine.amqp.topology import QUEUE_STATUS
from engine.pipeline.orderrows import prepare_connection


class Bus:
    """Publishes as the Resource Domain does (its broker user, named in user-id); looks at
    queues and publishes anything else as the administrator (`admin`)."""

    def __init__(self, reporter: aiormq.abc.AbstractChannel, user: str,
                 admin: aiormq.abc.AbstractChannel) -> None:
        self.reporter, self.user, self.admin = reporter, user, admin

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str) -> None:
        await self.reporter.basic_publish(
            body, exchange=exchange, routing_key=routing_key,
            properties=aiormq.spec.Basic.Properties(user_id=self.user))

    async def queue_declare(self, queue: str, *, passive: bool) -> aiormq.spec.Queue.DeclareOk:
        return await self.admin.queue_declare(queue, passive=passive)


@pytest.fixture
async def env(settings):
    redis = Redis.from_url(settings.redis_url)
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=3,
                                     init=prepare_connection)
    admin = await aiormq.connect(settings.amqp_url)
    rd = login(settings, RESOURCE_DOMAIN)
    reporter = await aiormq.connect(rd.url)
    channel = await admin.channel()
    await channel.queue_purge(QUEUE_STATUS)
    yield redis, pool, Bus(await reporter.channel(), rd.user, channel)
    await reporter.close()
    await admin.close()
    await pool.close()
    await redis.aclose()
