"""A failed order's unit goes back to its sale exactly once, whatever the batching and crashes.

Two guards keep it once: the row's `compensated_at IS NULL` (a report in a later
batch finds the order handled and does not call the refund script again), and the
gate's `refunded` set in lua/refund.lua (a refund that ran before a crash, its row
never marked, is refused when the redelivered report tries it again).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import REGISTRY
from support import sold_out_sale

from engine.amqp.topology import EXCHANGE, RK_STATUS
from engine.fulfilment.status_consumer import StatusConsumer, encode_report
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.orderstates import FAILED
from engine.pipeline.orders import Order
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


def compensations(result: str) -> float:
    return REGISTRY.get_sample_value("seckill_compensations_total", {"result": result}) or 0.0


def unchanged_reports() -> float:
    return REGISTRY.get_sample_value("seckill_status_updates_total",
                                     {"result": "unchanged"}) or 0.0


async def row(pool, instance_id: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM seckill_logs WHERE instance_id = $1", instance_id)


async def publish_failed(channel, order: Order) -> None:
    await channel.basic_publish(encode_report(order.instance_id, FAILED, reason="no GPU",
                                              user_id=order.user_id,
                                              product_id=order.product_id),
                                exchange=EXCHANGE, routing_key=RK_STATUS)


async def test_reports_in_later_batches_do_not_compensate_again(settings, env, product_id):
    redis, pool, channel = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    failed, _ = await sold_out_sale(pool, gate, product_id)
    refunded, again = compensations("refunded"), compensations("already_refunded")
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        await publish_failed(channel, failed)

        async def compensated() -> bool:
            return (await row(pool, failed.instance_id))["compensated_at"] is not None
        await wait_for(compensated, 20, "the first report's compensation")
        first_mark = (await row(pool, failed.instance_id))["compensated_at"]
        # Each later report goes in once the one before has been applied, so each is
        # a batch of its own that finds the row FAILED and compensated already.
        for n in (1, 2):
            seen = unchanged_reports()
            await publish_failed(channel, failed)

            async def applied(seen: float = seen) -> bool:
                return unchanged_reports() > seen
            await wait_for(applied, 20, f"later report {n} applied")
        stopping.set()  # the consumer finishes the batch it is in, then returns
        await asyncio.wait_for(task, 30)
    finally:
        stopping.set()
        await task
    r = await row(pool, failed.instance_id)
    assert r["status"] == FAILED
    assert r["compensated_at"] == first_mark, "a later batch handled the order again"
    assert compensations("refunded") - refunded == 1
    assert compensations("already_refunded") - again == 0, \
        "a later batch called the refund script for a compensated order"
    assert int(await redis.get(keys.stock(product_id))) == 1
    assert not await redis.sismember(keys.buyers(product_id), 1)


async def test_a_crash_between_refund_and_mark_does_not_refund_twice(settings, env,
                                                                     product_id):
    redis, pool, channel = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    failed, _ = await sold_out_sale(pool, gate, product_id)
    again = compensations("already_refunded")

    # The first consumer hands the unit back, then "dies" before marking the row:
    # it hangs right after the refund script returned, and is cancelled there (its
    # connection closes with the report unacknowledged, as if the process were killed).
    crashed = StatusConsumer(settings, redis, pool)
    refunded_once = asyncio.Event()
    real_refund = crashed.gate.refund

    async def refund_then_hang(*args, **kwargs):
        outcome = await real_refund(*args, **kwargs)
        assert outcome == "refunded"
        refunded_once.set()
        await asyncio.Future()  # never returns: the mark is never written
        return outcome

    crashed.gate.refund = refund_then_hang  # type: ignore[method-assign]
    stopping = asyncio.Event()
    task = asyncio.create_task(crashed.run(stopping))
    await publish_failed(channel, failed)
    try:
        await asyncio.wait_for(refunded_once.wait(), 20)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    r = await row(pool, failed.instance_id)
    assert r["status"] == FAILED and r["compensated_at"] is None  # the crash window
    assert int(await redis.get(keys.stock(product_id))) == 1

    # The broker redelivers the report to the next consumer: it finds the row unmarked,
    # runs the refund script again, which refuses, and marks the row.
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        async def compensated() -> bool:
            return (await row(pool, failed.instance_id))["compensated_at"] is not None
        await wait_for(compensated, 30, "the redelivered report's compensation")
    finally:
        stopping.set()
        await task
    assert compensations("already_refunded") - again == 1
    assert int(await redis.get(keys.stock(product_id))) == 1, "the unit was returned twice"
    assert await redis.llen(keys.free_slots(product_id)) == 1
    again_bought = await gate.buy(product_id, 3)
    assert again_bought.outcome == "accepted" and again_bought.slot == failed.slot
    assert (await gate.buy(product_id, 4)).outcome == "sold_out"
