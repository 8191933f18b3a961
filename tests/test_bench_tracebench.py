"""bench/tracebench.py's untraced build: HEAD with the tracing merge undone in engine/
(and the commit before it), extracted without touching our tree; none without git
history; the variants' turns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.enginerun import TICK
from bench.tracebench import (
    ROOT,
    VARIANTS,
    extract,
    merge_drains,
    order,
    untraced_build,
    untraced_commit,
)


def test_the_untraced_build_is_head_without_tracing(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("no git history here")
    commit = untraced_commit()
    assert commit is not None and len(commit) == 40
    before, reverted = tmp_path / "before", tmp_path / "reverted"
    before.mkdir()
    reverted.mkdir()
    extract(commit, before)
    assert not (before / "engine" / "tracing.py").exists()
    what = untraced_build(reverted)
    assert what is not None and "reverted" in what, what
    assert not (reverted / "engine" / "tracing.py").exists()
    # (the pipeline's hook is gone, and the tree runs: its modules import)
    assert "ordertrace" not in (reverted / "engine/pipeline/batches.py").read_text()
    code = "import engine.process.worker, engine.gate.app, engine.resource_domain.service"
    subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(reverted)},
                   cwd=tmp_path, check=True, timeout=60)


def test_without_git_history_there_is_no_untraced_build(tmp_path: Path) -> None:
    assert untraced_commit(tmp_path) is None


def test_the_variants_take_turns() -> None:
    assert order(0) == list(VARIANTS) and order(1) == list(reversed(VARIANTS))


def test_a_variants_drains_are_priced_by_their_ticks_summed() -> None:
    drains = [{"processed": 90_000, "ticks": {"workers": 130, "rabbitmq": 300},
               "cpu_us_per_order": 130 / TICK / 90_000 * 1e6},
              {"processed": 60_000, "ticks": {"workers": 70, "rabbitmq": 200},
               "cpu_us_per_order": 70 / TICK / 60_000 * 1e6}]
    merged = merge_drains(drains)
    assert merged["ticks"] == {"workers": 200, "rabbitmq": 500}
    assert merged["processed"] == 150_000
    assert merged["cpu_us_per_order"] == pytest.approx(200 / TICK / 150_000 * 1e6)
    assert merge_drains([drains[0], {"failed": "drain timed out"}])["failed"] == (
        "drain timed out")


def test_side_by_side_drains_are_priced_by_their_nanoseconds() -> None:
    """(a side's ticks truncate its window at each end: its nanoseconds do not)"""
    drains = [{"processed": 40_000, "ticks": {"workers": 70}, "cpu_ns": 701_000_000},
              {"processed": 50_000, "ticks": {"workers": 80}, "cpu_ns": 799_000_000}]
    merged = merge_drains(drains)
    assert merged["ticks"] == {"workers": 150}
    assert merged["cpu_us_per_order"] == pytest.approx(1_500_000 / 90_000)
