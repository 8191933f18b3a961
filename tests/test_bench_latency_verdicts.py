"""The latency targets of issue 24, shown failing on made-up figures: our p99 at 50% load
against the broker probe's p99 of the same round, and the 90% load bound."""

from __future__ import annotations

from typing import Any

import pytest
from support import judged_doc, target_named

from bench.latency import percentile
from bench.report import markdown
from bench.verdicts import P99_OVER_BROKER_BOUND, p99_over_broker

RATIO = "p99 at 50% load / the broker's own confirm p99"


def _lat(p99: float, broker: float | None) -> dict[str, Any]:
    run: dict[str, Any] = {"rate": 5_000.0, "p50_ms": 5.0, "p95_ms": 10.0, "p99_ms": p99,
                           "max_le_ms": 250.0}
    if broker is not None:
        run |= {"broker_p99_ms": broker, "broker": {"p99_ms": broker}}
    return run


def _doc(runs50: list[dict[str, Any]], runs90: list[dict[str, Any]]) -> dict[str, Any]:
    return judged_doc({"latency_50": {"runs": runs50}, "latency_90": {"runs": runs90}})


def test_our_p99_within_one_and_a_half_of_the_brokers_is_met() -> None:
    doc = _doc([_lat(14.0, 10.0), _lat(3.0, 2.5), _lat(30.0, 20.0)], [_lat(90.0, 5.0)] * 3)
    ratio = target_named(doc, RATIO)
    assert ratio["values"] == pytest.approx([1.4, 1.2, 1.5]) and ratio["met"] is True
    assert target_named(doc, "p99 at 90% load, ms")["met"] is True


def test_one_round_above_the_brokers_bound_fails_thetarget_named() -> None:
    doc = _doc([_lat(14.0, 10.0), _lat(16.0, 10.0), _lat(12.0, 10.0)], [_lat(101.0, 5.0)] * 3)
    ratio = target_named(doc, RATIO)
    assert ratio["values"] == pytest.approx([1.4, 1.6, 1.2])
    assert ratio["met"] is False and "crosses" in ratio["verdict"]
    assert ratio["bound"] == P99_OVER_BROKER_BOUND
    assert target_named(doc, "p99 at 90% load, ms")["met"] is False


def test_a_round_without_the_probe_is_not_met() -> None:
    """A fast engine and no broker figure must not pass: a ratio against nothing."""
    doc = _doc([_lat(1.0, 10.0), _lat(1.0, None), _lat(1.0, 10.0)], [_lat(5.0, 5.0)] * 3)
    ratio = target_named(doc, RATIO)
    assert ratio["met"] is False and "no broker p99" in ratio["verdict"]
    assert p99_over_broker([_lat(1.0, 0.0)])[1] == ["run 1 has no broker p99 to compare with"]
    assert p99_over_broker([{"failed": "boom"}])[1] == ["run 1 failed (boom)"]


def test_the_latency_table_puts_the_brokers_p99_beside_ours() -> None:
    table = markdown(_doc([_lat(14.0, 10.0)] * 3, [_lat(90.0, 60.0)] * 3))
    row = next(line for line in table.splitlines() if line.startswith("| 50% of capacity | 3"))
    assert "| 14.0 (14.0-14.0) | <= 250 | 10.0 (10.0-10.0) | 1.40 (1.40-1.40) |" in row


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.99) == 99.0 and percentile(values, 0.5) == 50.0
    assert percentile([7.0], 0.99) == 7.0
