"""The BFF's request metrics, written together every FLUSH_EVERY seconds
(engine.metrics.bff.Pending), read back exactly as if each request had been observed on
its own."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from pytest import approx

from engine.metrics import bff
from engine.testing.waits import wait_for

# 0.0005 and 1 sit on bucket bounds (a value counts in the bucket it is <= to), 2.0 is
# past the last one
VALUES = [0.0004, 0.0005, 0.0007, 0.003, 0.3, 1.0, 2.0]


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def _written(endpoint: str, code: str, count: int) -> None:
    """Wait (at most 5 s) for the flush that makes the count `count`."""
    async def counted() -> bool:
        return _sample("seckill_bff_requests_total", endpoint=endpoint, code=code) == count

    await wait_for(counted, 5, f"the request metrics written ({endpoint} {code}: {count})",
                   interval=bff.FLUSH_EVERY / 4)


async def test_requests_count_as_if_observed_one_by_one() -> None:
    endpoint = f"test-{id(VALUES)}"
    for value in VALUES:
        bff.observe(endpoint, 202, value)
    bff.observe(endpoint, 409, 0.001)
    await asyncio.sleep(0)  # the scenario: the end of the turn, and not written yet
    assert _sample("seckill_bff_requests_total", endpoint=endpoint, code="202") is None
    await _written(endpoint, "202", len(VALUES))
    assert _sample("seckill_bff_requests_total", endpoint=endpoint, code="409") == 1

    one_by_one = CollectorRegistry()
    reference = Histogram("ref", "one by one", buckets=bff.BUCKETS, registry=one_by_one)
    for value in [*VALUES, 0.001]:
        reference.observe(value)
    for le in [*(str(float(b)) for b in bff.BUCKETS), "+Inf"]:
        expected = one_by_one.get_sample_value("ref_bucket", {"le": le})
        got = _sample("seckill_bff_request_duration_seconds_bucket", endpoint=endpoint, le=le)
        assert got == expected, le
    assert _sample("seckill_bff_request_duration_seconds_sum", endpoint=endpoint) == approx(
        one_by_one.get_sample_value("ref_sum", {}))

    bff.observe(endpoint, 202, 0.01)  # the next ones at the next flush
    await _written(endpoint, "202", len(VALUES) + 1)
