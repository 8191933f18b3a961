"""The tracing cost targets of issue 25, shown failing on made-up figures: trace_sample 0
within 2% and 0.01 within 5% of the untraced build, every round's drains (windows)
pooled, per order in the engine and per accepted purchase at the BFF; no untraced
build, no verdict."""

from __future__ import annotations

from typing import Any

import pytest
from support import judged_doc, target_named

from bench.report import markdown
from bench.verdicts import NO_HISTORY

ENGINE_OFF = "tracing: worker CPU per order, trace_sample 0 /"
ENGINE_1 = "tracing: worker CPU per order, trace_sample 0.01 /"
BFF_OFF = "tracing: BFF CPU per accepted purchase, trace_sample 0 /"
BFF_1 = "tracing: BFF CPU per accepted purchase, trace_sample 0.01 /"


def _drain(us: float) -> dict[str, Any]:
    return {"cpu_us_per_order": us, "ticks": {"workers": 200}, "processed": 60_000}


def _window(us: float) -> dict[str, Any]:
    return {"cpu_us_per_accepted": us, "ticks": 300, "accepted": 20_000}


def _doc(engine: list[tuple[float, float, float, float]],
         bff: list[tuple[float, float, float, float]], commit: str = "e44739e") -> dict:
    names = ("untraced", "0", "0.01", "1")

    def runs(rows: list[tuple[float, ...]], make: Any) -> dict[str, Any]:
        return {"runs": [{"untraced_commit": commit,
                          "variants": {n: make(v) for n, v in zip(names, row, strict=True)}}
                         for row in rows]}
    return judged_doc({"trace_engine": runs(engine, _drain), "trace_http": runs(bff, _window)})


def test_tracing_within_its_bounds_is_met() -> None:
    doc = _doc([(20.0, 20.3, 20.9, 35.0)] * 3, [(100.0, 101.0, 104.0, 170.0)] * 3)
    for name, ratio in ((ENGINE_OFF, 1.015), (ENGINE_1, 1.045), (BFF_OFF, 1.01),
                        (BFF_1, 1.04)):
        t = target_named(doc, name)
        assert t["values"] == pytest.approx([ratio] * 3) and t["met"] is True, t
    table = markdown(doc)
    row = next(line for line in table.splitlines() if line.startswith("| trace_sample 1 |"))
    assert "| 35.0 (35.0-35.0) | 1.750 (1.750-1.750) (1.750) | 170.0" in row
    assert "The untraced build: e44739e" in table


def test_the_rounds_pooled_over_the_bound_fail_the_target() -> None:
    doc = _doc([(20.0, 20.3, 20.9, 35.0), (20.0, 20.5, 21.1, 35.0), (20.0, 20.5, 21.2, 35.0)],
               [(100.0, 101.0, 104.0, 170.0)] * 2 + [(100.0, 104.5, 108.0, 170.0)])
    for name, pooled in ((ENGINE_OFF, 1.0217), (ENGINE_1, 1.0533), (BFF_OFF, 1.0217),
                         (BFF_1, 1.0533)):
        t = target_named(doc, name)
        assert t["met"] is False and t["pooled"] == pytest.approx(pooled, abs=1e-4), t
        assert t["verdict"] == f"NO (all runs pooled: {t['pooled']:.3f})"


def test_one_round_over_the_bound_fails_though_the_pool_is_within() -> None:
    """Every round must be on the right side as well as the pool: one round over the
    bound, the rounds together within, is not met, and says why."""
    doc = _doc([(20.0, 20.3, 20.9, 35.0), (20.0, 20.5, 21.2, 35.0), (20.0, 20.0, 20.6, 35.0)],
               [(100.0, 101.0, 104.0, 170.0)] * 2 + [(100.0, 103.0, 106.0, 170.0)])
    for name in (ENGINE_OFF, ENGINE_1, BFF_OFF, BFF_1):
        t = target_named(doc, name)
        assert t["met"] is False and t["max"] > t["bound"] >= t["pooled"], t
        assert t["verdict"].startswith("NO (spread crosses the bound; all runs pooled: ")


def test_rounds_are_pooled_by_their_orders() -> None:
    """A round that measured more orders weighs more: ticks over orders, summed."""
    doc = _doc([(20.0, 20.0, 21.4, 35.0), (20.0, 20.0, 20.0, 35.0)],
               [(100.0, 100.0, 100.0, 100.0)] * 3)
    doc["results"]["trace_engine"]["runs"][1]["variants"]["0.01"]["processed"] = 180_000
    doc["results"]["trace_engine"]["runs"].append(doc["results"]["trace_engine"]["runs"][1])
    t = target_named(judged_doc(doc["results"]), ENGINE_1)
    # (21.4 * 60k + 20 * 180k * 2) / 420k / 20
    assert t["pooled"] == pytest.approx((21.4 * 60 + 20.0 * 360) / 420 / 20.0)


def test_without_an_untraced_build_nothing_is_met() -> None:
    doc = _doc([(20.0, 20.0, 20.0, 20.0)] * 3, [(100.0, 100.0, 100.0, 100.0)] * 3,
               commit=NO_HISTORY)
    for run in doc["results"]["trace_engine"]["runs"]:
        run["variants"]["untraced"] = {"failed": NO_HISTORY}
    doc = judged_doc(doc["results"])
    t = target_named(doc, ENGINE_OFF)
    assert t["met"] is False and NO_HISTORY in t["verdict"]
    assert target_named(doc, BFF_OFF)["met"] is True
    assert NO_HISTORY in markdown(doc)


def test_a_drain_too_short_for_the_clock_is_not_met() -> None:
    doc = _doc([(20.0, 20.0, 20.0, 20.0)] * 3, [(100.0, 100.0, 100.0, 100.0)] * 3)
    doc["results"]["trace_engine"]["runs"][1]["variants"]["0"]["ticks"] = {"workers": 40}
    t = target_named(judged_doc(doc["results"]), ENGINE_OFF)
    assert t["met"] is False and "0 CPU over 40 ticks" in t["verdict"]


def test_a_side_by_side_round_is_judged_against_the_untraced_worker_beside_it() -> None:
    """(bench/tracebench.py's engine phase): each variant drained beside its own
    untraced worker; the round's untraced figure over all its drains is only shown."""
    doc = _doc([(20.0, 20.3, 20.9, 35.0)] * 3, [(100.0, 101.0, 104.0, 170.0)] * 3)
    for run in doc["results"]["trace_engine"]["runs"]:
        run["variants"]["untraced"] = _drain(15.0)  # would put 0.01 at 1.39
        run["paired"] = {"0": _drain(20.0), "0.01": _drain(20.0), "1": _drain(25.0)}
    doc = judged_doc(doc["results"])
    t = target_named(doc, ENGINE_1)
    assert t["values"] == pytest.approx([1.045] * 3) and t["met"] is True, t
    assert t["pooled"] == pytest.approx(1.045)
    row = next(line for line in markdown(doc).splitlines()
               if line.startswith("| trace_sample 1 |"))
    assert "| 35.0 (35.0-35.0) | 1.400 (1.400-1.400) (1.400) |" in row
