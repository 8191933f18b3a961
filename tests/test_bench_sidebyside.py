"""bench/sidebyside.py: two engines of one worker each drain one backlog at once, each
worker's orders counted by the rows of the snowflake node its lease names."""

from __future__ import annotations

import pytest
from support import add_products

from bench.sidebyside import SIDES, drain_pair, pooled
from engine.config import Settings


async def _nothing(pids: list[int]) -> None:
    """(the test's own product and prefix: nothing of the bench's to empty)"""


async def test_both_workers_drain_one_backlog_and_each_is_priced(settings: Settings,
                                                                  product_id: int) -> None:
    await add_products(settings, [product_id])  # (drain_pair preloads the backlog)
    # batches enough for both to take some, and the sale found by both within 50 ms (at
    # the default half second the first to look drained 3,000 orders alone, once)
    small = {"batch_size": 100, "discovery_interval": 0.05}
    run = await drain_pair(settings, {"a": {}, "b": {}}, {"a": small, "b": small}, 10_000,
                           0.0, "b", reset=_nothing, pid=product_id)
    assert "failed" not in run, run["failed"]
    assert run["a"]["node"] != run["b"]["node"]
    assert run["a"]["orders"] + run["b"]["orders"] == 10_000
    for side in SIDES:
        assert run[side]["orders"] > 0
        # (threads and process read a moment apart; the ticks truncated at each end)
        assert abs(sum(run[side]["threads"].values()) - run[side]["cpu_ns"]) < 5e6
        assert abs(run[side]["cpu_ns"] / 1e7 - run[side]["ticks"]) <= 2
    assert run["b_over_a"] == run["b"]["cpu_us_per_order"] / run["a"]["cpu_us_per_order"]


def test_drains_pool_by_cpu_over_orders() -> None:
    drains = [{"a": {"cpu_ns": 100, "orders": 50_000}, "b": {"cpu_ns": 120, "orders": 40_000},
               "b_over_a": 1.5},
              {"a": {"cpu_ns": 60, "orders": 40_000}, "b": {"cpu_ns": 70, "orders": 50_000},
               "b_over_a": 0.93},
              {"failed": "timed out"}]
    m = pooled(drains)
    assert m["drains"] == 2 and m["failed"] == 1
    assert m["b_over_a"] == pytest.approx((190 / 90_000) / (160 / 90_000))
    assert m["each"] == [0.93, 1.5]
