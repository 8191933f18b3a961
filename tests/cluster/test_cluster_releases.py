"""Release requests read from a Redis Cluster: each product's release stream lives in
its own slot (the `{pid}` tag), every read goes to that slot's master."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from engine.amqp.topology import RK_RELEASED
from engine.fulfilment.releases import ReleaseRequests
from engine.keys import GROUP, Keys
from engine.pipeline.orderrows import prepare_connection, write_batch
from engine.pipeline.orders import Order
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def test_release_requests_of_many_slots_are_published(cluster_settings, cluster_redis,
                                                            product_ids):
    settings, redis = cluster_settings, cluster_redis
    keys = Keys(settings.key_prefix)
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=3,
                                     init=prepare_connection)
    orders = [Order(pid, 7, f"1-{i}", int(time.time()), "s", 1, b"s", pid * 10 + 1)
              for i, pid in enumerate(product_ids)]
    await write_batch(pool, orders, 10)
    await pool.execute("UPDATE seckill_logs SET status = 'RUNNING' WHERE product_id ="
                       " ANY($1::bigint[])", product_ids)
    for o in orders:
        await redis.sadd(keys.streams, o.product_id)
        await redis.xadd(keys.releases(o.product_id), {
            "uid": "7", "instance_id": str(o.instance_id), "stream_id": o.stream_id,
            "sale": "s", "at": "1"})
    await redis.xadd(keys.releases(orders[0].product_id), {"uid": "7"})  # no instance
    releases = ReleaseRequests(settings, redis, pool, keys, "test-0")
    stopping = asyncio.Event()
    try:
        async with EventTap(settings.amqp_url, RK_RELEASED) as tap:
            task = asyncio.create_task(releases.run(stopping))
            try:
                events = await tap.collect(len(orders), timeout=30)

                async def acknowledged() -> bool:
                    for o in orders:
                        pending = await redis.xpending(keys.releases(o.product_id), GROUP)
                        if pending["pending"]:
                            return False
                    return await redis.xlen(keys.release_dlq(orders[0].product_id)) == 1
                await wait_for(acknowledged, 30, "every request acknowledged")
            finally:
                stopping.set()
                await task
        statuses = {r[0] for r in await pool.fetch(
            "SELECT status FROM seckill_logs WHERE product_id = ANY($1::bigint[])",
            product_ids)}
    finally:
        await pool.close()
    assert sorted(e.instance_id for e in events) == sorted(o.instance_id for o in orders)
    assert statuses == {"RELEASING"}
