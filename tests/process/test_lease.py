"""A worker whose node-ID lease is taken exits with exits.LEASE_LOST; the supervisor
respawns it on another node, and no instance ID is issued twice."""

from __future__ import annotations

import asyncio
import re

import pytest
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    pending_count,
    push_orders,
    row_count,
    rows_at_least,
)

from engine import exits
from engine.pipeline.ids import decompose
from engine.process.worker import Worker
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

BOOTED = re.compile(r"worker (\d+) booted as \S+, node (\d+)")


def nodes_booted(output: str) -> list[tuple[int, int]]:
    """(slot, node) of every worker boot, in order."""
    return [(int(s), int(n)) for s, n in BOOTED.findall(output)]


async def steal(redis, keys, engine: EngineProcess, slot: int) -> int:
    """Someone else holds the slot's current node now (as if its lease had expired in
    Redis and another worker had taken it); returns the node."""
    node = [n for s, n in nodes_booted(engine.output()) if s == slot][-1]
    assert await redis.set(keys.node(node), "thief", px=120_000, xx=True)
    return node


async def respawned(engine: EngineProcess, boots: int) -> bool:
    return len(nodes_booted(engine.output())) == boots and await engine.booted(2)


async def test_a_lost_lease_exits_4_and_the_respawn_takes_another_node(
        settings, redis, keys, product_id):
    """Stolen twice: from an idle worker (its renewal finds out) and from a busy one (its
    next batch or its renewal, whichever comes first)."""
    pid = product_id
    orders = 30_000
    half = orders // 2
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    async with EventTap(settings.amqp_url) as tap:
        await push_orders(redis, keys, pid, range(1, half + 1))
        # renewed every 1.7 s: a theft is noticed within about that
        engine = EngineProcess(settings, workers=2, node_lease_ttl_ms=5000)
        try:
            await wait_for(lambda: engine.booted(2), 30, "two workers booted")
            await wait_for(lambda: all_done(settings, redis, keys, [pid], half), 120,
                           "the first half")
            idle = await steal(redis, keys, engine, 0)
            await wait_for(lambda: respawned(engine, 3), 60,
                           "idle worker 0 respawned after losing its lease")

            await push_orders(redis, keys, pid, range(half + 1, orders + 1),
                              first_slot=half + 1)
            await wait_for(lambda: rows_at_least(settings, [pid], half + 1000), 60,
                           "second half under way")
            busy = await steal(redis, keys, engine, 1)
            await wait_for(lambda: respawned(engine, 4), 60,
                           "busy worker 1 respawned after losing its lease")
            await wait_for(lambda: all_done(settings, redis, keys, [pid], orders), 120,
                           "every order, before, between and after the lost leases")
        finally:
            engine.stop()
        # a lost lease leaves a batch pending, published again (same IDs) by the next
        # worker: read until every order has an event, not until a count of events
        events = await collect_orders(tap, orders)
    out = engine.output()
    for slot in (0, 1):
        assert f"worker {slot} exited with {exits.LEASE_LOST} after" in out, out[-3000:]
    assert f"exited with {exits.FAILED}" not in out
    boots = nodes_booted(out)
    assert len(boots) == 4, boots
    assert idle not in [n for _, n in boots[2:]] and busy != boots[3][1], \
        "a respawned worker reused a stolen node"
    rows = await log_rows(settings, [pid])
    assert_one_id_per_order(rows, events, orders)
    # every ID's node is one a worker booted on
    assert {decompose(r["instance_id"])[1] for r in rows} <= {n for _, n in boots}
    # the stolen nodes are still the thief's: nothing of ours renewed or released them
    for node in (idle, busy):
        assert await redis.get(keys.node(node)) == b"thief"


async def test_no_id_is_issued_on_a_lost_lease(settings, redis, keys, product_id):
    """The batch finds out first (renewals are 20 s apart here): it takes no ID, logs no
    row, leaves its entries pending, and the worker ends with exits.LEASE_LOST."""
    pid = product_id
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    worker = Worker(settings.replace(node_lease_ttl_ms=60_000, graceful_timeout=5), slot=0)
    run = asyncio.create_task(worker.run())
    try:
        async def booted() -> bool:
            return getattr(worker, "reader", None) is not None and bool(worker.reader.cursors)
        await wait_for(booted, 30, "the worker booted and reading the sale's stream")
        assert await redis.set(keys.node(worker.lease.node_id), "thief", px=60_000, xx=True)
        assert not await worker.lease.renew()  # what its next renewal will find
        await push_orders(redis, keys, pid, range(1, 101))
        assert await asyncio.wait_for(run, 60) == exits.LEASE_LOST
    finally:
        worker.stop()
        await asyncio.wait_for(run, 30)
    assert await row_count(settings, [pid]) == 0, "a row was logged with an ID of a lost lease"
    pending = await pending_count(redis, keys, [pid])  # read, left for the next worker
    unread = (await redis.xinfo_groups(keys.stream(pid)))[0]["lag"]
    assert pending >= 1 and pending + unread == 100
