"""bench/tracebench.py's untraced build: HEAD with the tracing merge undone in engine/
(and the commit before it), extracted without touching our tree; none without git
history; the variants' turns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.tracebench import ROOT, VARIANTS, extract, order, untraced_build, untraced_commit


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
