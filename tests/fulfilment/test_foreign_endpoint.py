"""A status report may only name its own instance's endpoint under rd_domain: anything
else is dead-lettered, never written to seckill_logs (where a buyer would read it)."""

from __future__ import annotations

import asyncio

import pytest

from engine.fulfilment.status_consumer import StatusConsumer, encode_report
from engine.gate.client import Gate
from engine.keys import RUNNING, Keys
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def test_an_endpoint_outside_rd_domain_is_dead_lettered(settings, env, product_id,
                                                              log_orders, publish, rows):
    redis, pool, channel = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    orders = await log_orders(pool, gate, product_id, [1, 2, 3, 4, 5])
    a, b, c, d, e = (o.instance_id for o in orders)
    domain = settings.rd_domain
    bad = {a: "https://evil.example/phish", b: f"https://{c}.{domain}",  # another's host
           c: f"http://{c}.{domain}", d: f"https://{d}.{domain}.evil.example"}
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        for instance, endpoint in bad.items():
            await publish(channel, encode_report(instance, RUNNING, endpoint=endpoint))
        await publish(channel, encode_report(e, RUNNING, endpoint=f"https://{e}.{domain}"))

        async def judged() -> bool:
            return (await redis.xlen(consumer.keys.status_dlq) == 4
                    and (await rows(pool, product_id))[e]["status"] == RUNNING)
        await wait_for(judged, 20, "four reports dead-lettered, one applied")
    finally:
        stopping.set()
        await task
    r = await rows(pool, product_id)
    assert all(r[i]["status"] == "PROCESSING" and r[i]["endpoint"] is None for i in bad)
    letters = [f for _, f in await redis.xrange(consumer.keys.status_dlq)]
    assert {f[b"reason"] for f in letters} == {b"foreign_endpoint"}
    assert {int(f[b"instance_id"]) for f in letters} == set(bad)
