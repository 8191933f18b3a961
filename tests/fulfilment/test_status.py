"""Status reports into seckill_logs and compensation, against the real services."""

from __future__ import annotations

import asyncio
import datetime as dt

from prometheus_client import REGISTRY

from engine.fulfilment.status_consumer import (
    Report,
    StatusConsumer,
    encode_report,
    one_per_instance,
)
from engine.gate.client import Gate
from engine.keys import FAILED, QUEUE_STATUS, RUNNING, Keys
from engine.pipeline.logsink import write_batch
from engine.pipeline.orders import Order
from engine.testing.waits import wait_for


def unchanged_reports() -> float:
    """Reports of known instances that changed nothing: each report beyond the one applied."""
    return REGISTRY.get_sample_value("seckill_status_updates_total",
                                     {"result": "unchanged"}) or 0.0


async def test_reports_apply_once_and_terminal_states_stick(settings, env, product_id,
                                                             log_orders, publish, rows):
    redis, pool, channel = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    orders = await log_orders(pool, gate, product_id, [1, 2, 3])
    a, b, c = (o.instance_id for o in orders)
    consumer = StatusConsumer(settings.replace(status_unknown_retry=1.0), redis, pool)
    unchanged = unchanged_reports()
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        ep_a = f"https://{a}.{settings.rd_domain}"
        await publish(channel, encode_report(a, RUNNING, endpoint=ep_a, timestamp=100))
        await publish(channel, encode_report(a, RUNNING, endpoint=ep_a, timestamp=100))
        # b: same second, FAILED first: it wins however the two are batched
        await publish(channel, encode_report(b, FAILED, reason="no GPU", timestamp=200))
        await publish(channel, encode_report(b, RUNNING, endpoint=f"https://{b}.{settings.rd_domain}",
                                             timestamp=200))
        await publish(channel, b"garbage")
        await publish(channel, encode_report(987654321987, RUNNING))  # unknown instance

        async def a_running() -> bool:
            return (await rows(pool, product_id))[a]["status"] == RUNNING
        await wait_for(a_running, 20, "a RUNNING")
        # late and older: the row is terminal already, so it changes nothing
        await publish(channel, encode_report(a, FAILED, reason="late, older", timestamp=50))

        async def settled() -> bool:
            r = await rows(pool, product_id)
            dlq = await redis.xlen(consumer.keys.status_dlq)
            queued = (await channel.queue_declare(QUEUE_STATUS, passive=True)).message_count
            # five reports of a and b, two applied: the late one's batch has committed too
            return (r[b]["status"] == FAILED and dlq == 2 and queued == 0
                    and unchanged_reports() - unchanged == 3)
        await wait_for(settled, 20, "reports applied and two dead-lettered")
    finally:
        stopping.set()
        await task
    r = await rows(pool, product_id)
    assert (r[a]["status"], r[a]["endpoint"], r[a]["reason"]) == (RUNNING, ep_a, None)
    assert (r[b]["status"], r[b]["reason"], r[b]["endpoint"]) == (FAILED, "no GPU", None)
    assert r[c]["status"] == "PROCESSING"
    assert r[b]["compensated_at"] is not None and r[a]["compensated_at"] is None
    reasons = {f[b"reason"] for _, f in await redis.xrange(consumer.keys.status_dlq)}
    assert reasons == {b"bad_report", b"unknown_instance"}
    declared = await channel.queue_declare(QUEUE_STATUS, passive=True)
    assert declared.message_count == 0  # everything acknowledged


def report(instance_id: int, status: str, at: int, tag: int, **text: str) -> Report:
    return Report(tag, instance_id, status, text.get("endpoint", ""), text.get("reason", ""),
                  dt.datetime.fromtimestamp(at, dt.UTC), 0.0)


def test_one_report_per_instance_the_earliest_then_the_first_to_arrive():
    batch = [report(1, RUNNING, 100, 1), report(1, FAILED, 50, 2), report(2, RUNNING, 7, 3),
             report(1, RUNNING, 50, 4), report(2, FAILED, 7, 5), report(3, FAILED, 9, 6)]
    kept, superseded = one_per_instance(batch)
    assert [r.delivery_tag for r in kept] == [2, 3, 6]
    assert sorted(r.delivery_tag for r in superseded) == [1, 4, 5]


async def test_one_batch_with_conflicting_reports_applies_the_earliest(settings, env,
                                                                       product_id, log_orders,
                                                                       rows):
    """Both reports of an instance in one UPDATE: the earliest event wins, every time."""
    redis, pool, _ = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    orders = await log_orders(pool, gate, product_id, [1, 2])
    x, y = (o.instance_id for o in orders)
    consumer = StatusConsumer(settings, redis, pool)  # not consuming: no channel, no acks
    await consumer.apply([
        report(x, RUNNING, 100, 1, endpoint="https://x"), report(x, FAILED, 50, 2,
                                                                 reason="older"),
        report(y, RUNNING, 70, 3, endpoint="https://y"), report(y, FAILED, 70, 4, reason="tie"),
        report(x, RUNNING, 100, 5, endpoint="https://x")])
    r = await rows(pool, product_id)
    assert (r[x]["status"], r[x]["reason"], r[x]["endpoint"]) == (FAILED, "older", None)
    assert (r[y]["status"], r[y]["endpoint"]) == (RUNNING, "https://y")
    assert r[x]["compensated_at"] is not None and r[y]["compensated_at"] is None


async def test_a_report_that_overtakes_its_row_is_applied_later(settings, env, product_id,
                                                                log_orders, publish, rows):
    redis, pool, channel = env
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 10)
    consumer = StatusConsumer(settings.replace(status_unknown_retry=30), redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        instance_id = product_id * 1000  # the first order log_orders will write
        await publish(channel, encode_report(instance_id, RUNNING,
                                             endpoint=f"https://{instance_id}.{settings.rd_domain}"))

        async def held() -> bool:  # seen before its row exists, and kept for later
            return any(r.instance_id == instance_id for r in consumer._held)
        await wait_for(held, 20, "the report held for an unknown instance", interval=0.02)
        await log_orders(pool, gate, product_id, [9])

        async def applied() -> bool:
            return (await rows(pool, product_id))[instance_id]["status"] == RUNNING
        await wait_for(applied, 20, "the held report applied")
    finally:
        stopping.set()
        await task


async def test_failure_returns_the_unit_exactly_once(settings, env, product_id, log_orders,
                                                     publish, rows):
    redis, pool, channel = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 2)
    orders = await log_orders(pool, gate, product_id, [1, 2])
    assert (await gate.buy(product_id, 3)).outcome == "sold_out"
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    failed = orders[0]
    unchanged = unchanged_reports()
    try:
        for _ in range(3):  # reported three times: returned once
            await publish(channel, encode_report(failed.instance_id, FAILED, reason="boom"))

        async def compensated() -> bool:
            return (await rows(pool, product_id))[failed.instance_id]["compensated_at"] \
                is not None
        await wait_for(compensated, 20, "compensation")

        async def all_applied() -> bool:  # three reports, one applied
            return unchanged_reports() - unchanged == 2
        await wait_for(all_applied, 20, "the other two reports")
    finally:
        stopping.set()
        await task
    assert int(await redis.get(keys.stock(product_id))) == 1
    assert not await redis.sismember(keys.buyers(product_id), 1)
    again = await gate.buy(product_id, 3)  # another user buys the returned unit
    assert again.outcome == "accepted" and again.slot == failed.slot
    assert (await gate.buy(product_id, 4)).outcome == "sold_out"
    # the engine can log the new holder of the same unit: the failed row released it
    new = Order(product_id, 3, again.stream_id, 1, failed.sale_id, again.slot, b"s",
                product_id * 1000 + 50)
    assert len((await write_batch(pool, [new], 10)).logged) == 1
    # a refund attempt for the same order again returns nothing more
    assert await gate.refund(product_id, 1, failed.sale_id, failed.slot, failed.stream_id) == \
        "already_refunded"
