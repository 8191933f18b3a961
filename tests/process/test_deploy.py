"""Alert rules, dashboard and systemd unit: valid, and naming only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "engine" / "deploy"
DEFINED = re.compile(r'(?:Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*"(seckill_[a-z_]+)"')
USED = re.compile(r"\bseckill_[a-z_]+\b")


def defined_metrics() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "engine").rglob("*.py"):
        names |= set(DEFINED.findall(path.read_text()))
    health = (ROOT / "engine" / "process" / "health.py").read_text()
    names |= set(re.findall(r'"(seckill_[a-z_]+)"', health))
    return names


def exists(name: str, defined: set[str]) -> bool:
    return name in defined or re.sub(r"_(bucket|sum|count)$", "", name) in defined


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make test installs Debian's prometheus package)")
    done = subprocess.run([promtool, "check", "rules", str(OPS / "alerts.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


def test_alerts_and_dashboard_name_only_real_metrics():
    defined = defined_metrics()
    assert {"seckill_orders_processed_total", "seckill_stream_lag",
            "seckill_compensations_total"} <= defined
    for path in (OPS / "alerts.yml", OPS / "dashboard.json"):
        used = set(USED.findall(path.read_text())) - {"seckill_engine"}
        unknown = {u for u in used if not exists(u, defined)}
        assert not unknown, f"{path.name} uses metrics nobody exports: {sorted(unknown)}"


def test_dashboard_is_grafana_json_with_a_row_per_stage():
    dash = json.loads((OPS / "dashboard.json").read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Gate and streams", "Engine: read and log", "Engine: publish",
                    "Engine: acknowledge and latency", "Status and compensation", "Workers"]
    assert all(p["targets"][0]["expr"] for p in dash["panels"] if p["type"] != "row")
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_metric_names_follow_prometheus_conventions():
    for name in defined_metrics():
        assert name.startswith("seckill_")
        assert not re.search(r"_(ms|milliseconds|size)$", name), name


def test_systemd_unit_stops_later_than_the_graceful_timeout():
    from engine.config import Settings

    unit = (OPS / "seckill.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    stop = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))
    assert stop > Settings().graceful_timeout
