"""A status report may only name its own instance's endpoint under rd_domain: anything
else is dead-lettered, never written to seckill_logs (where a buyer would read it)."""

from __future__ import annotations

import asyncio

import pytest
from statusreports import log_orders, owners, publish, rows

from engine.fulfilment.status_consumer import Report, StatusConsumer, encode_report, endpoint_ok
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.orderstates import RUNNING
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def test_an_endpoint_outside_rd_domain_is_dead_lettered(settings, env, product_id):  # noqa: F811
    redis, pool, channel = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    orders = await log_orders(pool, gate, product_id, [1, 2, 3, 4, 5])
    a, b, c, d, e = (o.instance_id for o in orders)
    of = owners(orders)
    domain = settings.rd_domain
    bad = {a: "https://evil.example/phish", b: f"https://{c}.{domain}",  # another's host
           c: f"http://{c}.{domain}", d: f"https://{d}.{domain}.evil.example"}
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        for instance, endpoint in bad.items():
            await publish(channel, encode_report(instance, RUNNING, endpoint=endpoint,
                                                 **of[instance]))
        await publish(channel, encode_report(e, RUNNING, endpoint=f"https://{e}.{domain}",
                                             **of[e]))

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


def endpoint_of(instance_id: int, endpoint: str, domain: str = "gpu.example.internal") -> bool:
    return endpoint_ok(Report(1, instance_id, RUNNING, endpoint, "", None, 0.0), domain)


@pytest.mark.parametrize("endpoint", [
    "https://evil.example\\.42.gpu.example.internal",  # the reproduced attack: host evil.example
    "https://evil.example/.42.gpu.example.internal",
    "https://user@42.gpu.example.internal",
    "https://42.gpu.example.internal@evil.example",
    "https://evil.example%2F.42.gpu.example.internal",
    "https://42.gpu.example.internal%2F@evil.example",
    "https://42.GPU.example.internal",
    "https://42.gpu.example.internal:8443",
    "https://x..42.gpu.example.internal",
    "https:// 42.gpu.example.internal",
    "https://42.gpu.example.internal/a?next=https://evil.example",
    "https://42.gpu.example.internal#@evil.example",
    "https://42.gpu.example.internal\t",
    "HTTPS://42.gpu.example.internal",
])
def test_an_endpoint_a_browser_could_read_differently_is_refused(endpoint):
    assert not endpoint_of(42, endpoint)


@pytest.mark.parametrize("endpoint", [
    "", "https://42.gpu.example.internal", "https://42.gpu.example.internal/",
    "https://42.gpu.example.internal:443/lab", "https://jupyter.42.gpu.example.internal",
])
def test_the_instance_own_endpoints_pass(endpoint):
    assert endpoint_of(42, endpoint)


async def test_the_backslash_host_attack_is_dead_lettered(settings, env, product_id):
    """`https://evil.example\\.<id>.<rd_domain>`: urlsplit's host ends in our domain,
    a browser's is evil.example. Never written where the victim would read it."""
    redis, pool, channel = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    [victim] = await log_orders(pool, gate, product_id, [1])
    attack = f"https://evil.example\\.{victim.instance_id}.{settings.rd_domain}"
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        await publish(channel, encode_report(victim.instance_id, RUNNING, endpoint=attack,
                                             **owners([victim])[victim.instance_id]))

        async def judged() -> bool:
            return await redis.xlen(consumer.keys.status_dlq) == 1
        await wait_for(judged, 20, "the report dead-lettered")
    finally:
        stopping.set()
        await task
    row = (await rows(pool, product_id))[victim.instance_id]
    assert (row["status"], row["endpoint"]) == ("PROCESSING", None)
    [(_, letter)] = await redis.xrange(consumer.keys.status_dlq)
    assert letter[b"reason"] == b"foreign_endpoint"
