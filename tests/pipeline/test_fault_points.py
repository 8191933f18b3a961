"""A worker SIGKILLed at each point of a batch: the respawned worker finishes the batch,
and every accepted order still has one row, one instance ID, and events carrying it."""

from __future__ import annotations

import pytest
from support import add_products, all_done, log_rows, workers_are

from engine.gate.redis_gate import Gate
from engine.keys import DLQ_SUFFIX
from engine.pipeline.faults import POINTS
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

STOCK = 300
BUYERS = 360  # the last 60 find it sold out
POISON = 5  # entries added by hand that cannot be decoded: dead letters


@pytest.mark.parametrize("point", POINTS)
async def test_a_worker_killed_at_a_batch_point_loses_and_doubles_nothing(
        settings, redis, keys, product_id, point, tmp_path):
    await add_products(settings, [product_id])
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, STOCK)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=20, fault_point=point,
                               fault_dir=str(tmp_path))
        try:
            await wait_for(lambda: engine.booted(2), 30, "two booted workers")
            accepted = await _buy(gate, product_id, range(1, BUYERS // 2))
            poison = [await redis.xadd(keys.stream(product_id), {"uid": "not-a-user", "ts": "1"})
                      for _ in range(POISON)]
            accepted += await _buy(gate, product_id, range(BUYERS // 2, BUYERS + 1))
            await wait_for(lambda: _killed(engine, point), 60, f"a worker killed {point}")
            await wait_for(lambda: all_done(settings, redis, keys, [product_id], len(accepted)),
                           120, "every order after the kill")
            await wait_for(lambda: workers_are(engine, 2), 30, "the killed worker replaced")
            events = await collect_orders(tap, len(accepted))
        finally:
            engine.stop()
    rows = await log_rows(settings, [product_id])
    assert len(accepted) == STOCK
    assert {r["stream_id"] for r in rows} == set(accepted)  # none lost, none unexpected
    assert sorted(r["slot"] for r in rows) == list(range(1, STOCK + 1))  # none oversold
    assert_one_id_per_order(rows, events, STOCK)  # a redelivered event has the same ID
    letters = await redis.xrange(keys.stream(product_id) + DLQ_SUFFIX)
    assert sorted(f[b"id"] for _, f in letters) == sorted(poison)  # each exactly once
    assert engine.output().count(f"fault point {point}: SIGKILL") == 1


async def _buy(gate: Gate, product_id: int, users: range) -> list[str]:
    """Stream IDs of the accepted purchases."""
    results = [await gate.buy(product_id, uid) for uid in users]
    return [r.stream_id for r in results if r.outcome == "accepted" and r.stream_id]


async def _killed(engine: EngineProcess, point: str) -> bool:
    out = engine.output()
    return f"fault point {point}: SIGKILL" in out and "exited with -9" in out
