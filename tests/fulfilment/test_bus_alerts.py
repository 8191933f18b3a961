"""The message bus's trust alerts fire on the first refused message (promtool's own rule
tests, engine/deploy/alerts_test.yml), and name metrics the consumers export."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "engine" / "deploy"


def test_refused_bus_messages_raise_an_alert():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make test installs Debian's prometheus package)")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_watch_the_counters_the_consumers_increment():
    from engine.metrics import daemon, resource_domain

    assert daemon.STATUS_DEAD_LETTERS._name == "seckill_status_dead_letters"
    assert resource_domain.DEAD_LETTERS._name == "seckill_rd_dead_letters"
    rules = (DEPLOY / "alerts.yml").read_text()
    assert 'seckill_status_dead_letters_total{reason=~"untrusted_sender|report_mismatch"}' in rules
    assert "seckill_rd_dead_letters_total" in rules
