"""The seed's `ProcessSeckillOrder` taken literally: one order at a time, every wait in line.

Read one entry, take an ID, query the product, publish and wait for the
confirm, insert the row, acknowledge. This is what a team writes first, and
the baseline the engine is quoted against.
"""

from __future__ import annotations

import time
from typing import Any

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.amqp.framing import PERSISTENT
from engine.amqp.topology import CONTENT_TYPE, EXCHANGE, RK_CREATED
from engine.config import Settings
from engine.keys import GROUP, Keys
from engine.pb import event_pb2
from engine.pipeline.ids import Snowflake

from .env import preload, purge_queues


async def run_naive(settings: Settings, total: int) -> dict[str, Any]:
    pid = 990_000_002
    await preload(settings, [pid], total)
    keys = Keys(settings.key_prefix)
    stream = keys.stream(pid)
    redis = Redis.from_url(settings.redis_url)
    pg = await asyncpg.connect(settings.pg_dsn)
    mq = await aiormq.connect(settings.amqp_url)
    channel = await mq.channel(publisher_confirms=True)
    ids = Snowflake(1023)
    done = 0
    start = time.perf_counter()
    try:
        while done < total:
            reply = await redis.xreadgroup(GROUP, "naive", {stream: ">"}, count=1)
            if not reply:
                break
            entry_id, fields = reply[0][1][0]
            instance_id = ids.next_id()
            product = await pg.fetchrow(
                "SELECT id, name, cpus, memory_mb, gpu, image FROM products WHERE id = $1", pid)
            event = event_pb2.Event(
                event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id,
                user_id=int(fields[b"uid"]), name=product["name"], timestamp=int(time.time()),
                spec=event_pb2.InstanceSpec(cpus=product["cpus"], memory_mb=product["memory_mb"],
                                            gpu=product["gpu"], image=product["image"]))
            await channel.basic_publish(
                event.SerializeToString(), exchange=EXCHANGE, routing_key=RK_CREATED,
                mandatory=True, properties=aiormq.spec.Basic.Properties(
                    content_type=CONTENT_TYPE, delivery_mode=PERSISTENT,
                    message_id=str(instance_id), message_type="INSTANCE_CREATED"))
            await pg.execute(
                "INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id, status)"
                " VALUES ($1, $2, $3, $4, 'PROCESSING')",
                pid, int(fields[b"uid"]), instance_id, entry_id.decode())
            await redis.xack(stream, GROUP, entry_id)
            done += 1
    finally:
        await redis.aclose()
        await pg.close()
        await mq.close()
    elapsed = time.perf_counter() - start
    await purge_queues(settings)
    return {"orders": done, "seconds": elapsed, "per_second": done / elapsed}
