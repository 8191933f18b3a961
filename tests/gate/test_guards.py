"""The BFF's guards on their own: the in-flight cap and the throttle of failed
authentications (the real BFF's use of them: tests/gate/test_abuse.py)."""

from __future__ import annotations

import time

import pytest

from engine.errors import Overloaded
from engine.gate.guards import FailureThrottle, InflightCap


def test_the_cap_counts_what_runs_and_refuses_past_it():
    cap = InflightCap(2)
    with cap, cap:
        assert cap.count == 2
        with pytest.raises(Overloaded), cap:
            pass
    assert cap.count == 0
    with pytest.raises(ValueError), cap:  # a failure in the work gives its slot back
        raise ValueError
    assert cap.count == 0
    unbounded = InflightCap(0)
    with unbounded, unbounded, unbounded:
        assert unbounded.count == 3


def test_failures_are_spent_per_address_then_refill():
    throttle = FailureThrottle(rate=10.0, burst=3)
    for _ in range(3):
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
    with pytest.raises(Overloaded) as refused:
        throttle.check("10.0.0.1")
    assert refused.value.retry_after == 1
    throttle.check("10.0.0.2")  # another address is not concerned
    throttle.check(None)
    time.sleep(0.15)  # 10 per second: one failure back
    throttle.check("10.0.0.1")


def test_an_ipv6_client_is_counted_by_its_64():
    throttle = FailureThrottle(rate=0.1, burst=2)
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2:ffff::9")
    with pytest.raises(Overloaded):
        throttle.check("2001:db8:1:2::77")
    throttle.check("2001:db8:1:3::1")


def test_the_buckets_are_bounded_and_the_oldest_goes_first():
    throttle = FailureThrottle(rate=0.001, burst=1, size=1000)
    for i in range(5000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle.buckets) == 1000
    throttle.check("10.0.0.0")  # among the first: forgotten
    with pytest.raises(Overloaded):
        throttle.check("10.0.19.135")  # the last one (4999)
    started = time.perf_counter()
    for i in range(20000):  # at the bound each new address costs the same (O(1))
        throttle.failed(f"11.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert time.perf_counter() - started < 1.0


def test_no_rate_no_throttle():
    throttle = FailureThrottle(rate=0.0, burst=1)
    for _ in range(10):
        throttle.failed("10.0.0.1")
        throttle.check("10.0.0.1")
    assert not throttle.buckets


def test_an_address_that_keeps_failing_stays_counted():
    throttle = FailureThrottle(rate=0.001, burst=1, size=10)
    throttle.failed("9.9.9.9")
    for i in range(100):  # ten times more other addresses than there are buckets
        throttle.failed(f"10.0.0.{i}")
        assert "9.9.9.9" in throttle.buckets, i
        throttle.failed("9.9.9.9")
