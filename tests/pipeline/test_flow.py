"""A sale's orders through `seckill run`: rows, instance IDs and events as the contract says."""

from __future__ import annotations

import subprocess
import time

import pytest
from support import add_products, all_done, announce, log_rows, open_sales, push_orders

from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import SECKILL, EngineProcess, engine_env
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)


async def test_50k_orders_three_products_two_workers(settings, redis, keys, product_ids):
    pids = product_ids[:3]
    await open_sales(settings, redis, keys, pids)
    sizes = [16_667, 16_667, 16_666]
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2)
        try:
            for pid, n in zip(pids, sizes, strict=True):
                await push_orders(redis, keys, pid, range(1, n + 1))
            await wait_for(lambda: all_done(settings, redis, keys, pids, 50_000), 180,
                           "50,000 orders logged and acknowledged")
            events = await tap.collect(50_000, timeout=60)
        finally:
            engine.stop()
    rows = await log_rows(settings, pids)
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], 50_000)
    assert all(r["status"] == "PROCESSING" for r in rows)
    for pid, n in zip(pids, sizes, strict=True):
        mine = [r for r in rows if r["product_id"] == pid]
        assert sorted(r["slot"] for r in mine) == list(range(1, n + 1))
        groups = await redis.xinfo_groups(keys.stream(pid))
        assert groups[0]["pending"] == 0 and groups[0]["lag"] == 0
    e = events[0]
    assert e.event_type == 1 and e.name.startswith("GPU instance") and e.spec.gpu == "A100"
    assert engine.wait(1) == 0


async def test_event_properties_follow_the_contract(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=1)
        try:
            await push_orders(redis, keys, product_id, [77])
            await tap.collect(1, timeout=30)
        finally:
            engine.stop()
    props, event = tap.events[0]
    assert props.delivery_mode == 2
    assert props.content_type == "application/x-protobuf"
    assert props.message_type == "INSTANCE_CREATED"
    assert props.message_id == str(event.instance_id)
    assert abs(props.timestamp.timestamp() - time.time()) < 120
    assert event.user_id == 77 and event.slot == 1 and event.sale_id == "sale-1"
    assert event.timestamp > 1_700_000_000


async def test_hand_added_entry_in_the_seed_form(settings, redis, keys, product_id):
    """`XADD stream:seckill:{1001} * uid 123 ts 1234567890` with no sale opened."""
    await add_products(settings, [product_id])
    engine = EngineProcess(settings, workers=1)
    try:
        await redis.execute_command("XADD", keys.stream(product_id), "*", "uid", "123",
                                    "ts", "1234567890")
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 1), 30,
                       "the hand-added order")
    finally:
        engine.stop()
    (row,) = await log_rows(settings, [product_id])
    assert row["user_id"] == 123 and row["sale_id"] is None and row["slot"] is None


async def test_a_sale_opened_while_running_is_picked_up(settings, redis, keys, product_id):
    """No restart: discovery (not the janitor's scan, kept out of the way) finds the sale."""
    await add_products(settings, [product_id])
    engine = EngineProcess(settings, workers=2, discovery_interval=0.5, janitor_interval=600)
    try:
        await wait_for(lambda: engine.booted(2), 30, "two booted workers")
        opened = subprocess.run([SECKILL, "sale", "open", "--product", str(product_id),
                                 "--stock", "100"], env=engine_env(settings),
                                capture_output=True, text=True, timeout=60)
        assert opened.returncode == 0, opened.stderr
        await push_orders(redis, keys, product_id, range(1, 101))
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 100), 30,
                       "the new sale's orders")
    finally:
        engine.stop()
    assert len(await log_rows(settings, [product_id])) == 100
