"""The Redis Cluster phases' verdicts (bench/report.py), broken on purpose: a cluster that
costs 3 times the single Redis per order, 1,000 sales that cost 3 times 1 sale, a spread
that crosses the bound, a run whose worker died, a window too short for the clock."""

from __future__ import annotations

from typing import Any

from bench.report import markdown, targets

VS_SINGLE = "Redis Cluster / single Redis, worker CPU per order (100 sales)"
SCALE = "Redis Cluster: CPU per order, 1000 sales / 1 sale"
MACHINE = {"cpu_model": "test", "cores": 2, "memory_gb": 4, "python": "3.11", "redis": "7",
           "rabbitmq": "3", "postgresql": "15"}


def _run(cpu: float, ticks: int = 200, per_second: float = 10_000.0) -> dict[str, Any]:
    return {"orders": 60_000, "seconds": 6.0, "per_second": per_second, "rows": 60_000,
            "cpu_us_per_order": cpu, "ticks": {"workers": ticks}, "tick_hz": 100}


def _doc(single: list[Any], clustered: list[Any], one: list[Any], thousand: list[Any],
         mode: str = "full") -> dict[str, Any]:
    def runs(values: list[Any]) -> dict[str, Any]:
        return {"runs": [v if isinstance(v, dict) else _run(v) for v in values]}
    doc = {"mode": mode, "rounds": 3, "seconds": 60.0, "machine": MACHINE,
           "results": {"cluster_single_100": runs(single), "cluster_100": runs(clustered),
                       "cluster_scale_1": runs(one), "cluster_scale_1000": runs(thousand)}}
    doc["targets"] = targets(doc)
    return doc


def _target(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in doc["targets"] if t["target"] == name)


def test_met_when_every_round_is_within_the_bound() -> None:
    doc = _doc([40, 42, 41], [30, 31, 44], [25, 26, 27], [35, 36, 38])
    assert _target(doc, VS_SINGLE)["met"] is True
    assert _target(doc, SCALE)["met"] is True
    assert _target(doc, SCALE)["values"] == [35 / 25, 36 / 26, 38 / 27]
    table = markdown(doc)
    assert "Redis Cluster, 3 masters: 100 sales" in table and "| orders/s | 1.00 " in table


def test_a_cluster_three_times_the_single_redis_fails() -> None:
    doc = _doc([40, 40, 40], [120, 120, 120], [25, 25, 25], [30, 30, 30])
    t = _target(doc, VS_SINGLE)
    assert t["met"] is False and t["verdict"] == "NO" and t["median"] == 3.0


def test_a_thousand_sales_three_times_one_sale_fails() -> None:
    doc = _doc([40, 40, 40], [40, 40, 40], [25, 25, 25], [75, 75, 75])
    assert _target(doc, SCALE)["verdict"] == "NO"


def test_one_round_over_the_bound_fails_the_target() -> None:
    doc = _doc([40, 40, 40], [40, 40, 40], [25, 25, 25], [30, 30, 40])  # 1.6 in round 3
    assert _target(doc, SCALE)["verdict"] == "NO (spread crosses the bound)"


def test_a_failed_run_or_a_short_window_fails_the_target() -> None:
    died = {"failed": "a worker died during the run"}
    doc = _doc([40, 40, 40], [40, died, 40], [25, 25, 25], [30, 30, _run(30, ticks=20)])
    assert "worker died" in _target(doc, VS_SINGLE)["verdict"]
    assert _target(doc, VS_SINGLE)["met"] is False
    assert "20 ticks" in _target(doc, SCALE)["verdict"]
    assert _target(doc, SCALE)["met"] is False


def test_a_quick_run_is_not_judged_and_a_suite_without_the_phase_has_no_target() -> None:
    quick = _doc([40], [120], [25], [75], mode="quick")
    assert _target(quick, VS_SINGLE)["met"] is None
    doc = {"mode": "full", "machine": MACHINE, "results": {}}
    assert not [t for t in targets(doc) if t["target"] in (VS_SINGLE, SCALE)]
