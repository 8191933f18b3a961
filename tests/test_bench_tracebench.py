"""bench/tracebench.py's untraced build: the commit before engine/tracing.py came, its
tree extracted without touching ours; none without git history; the variants' turns."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.tracebench import ROOT, VARIANTS, extract, order, untraced_commit


def test_the_untraced_build_is_the_tree_before_tracing(tmp_path: Path) -> None:
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("no git history here")
    commit = untraced_commit()
    assert commit is not None and len(commit) == 40
    extract(commit, tmp_path)
    assert (tmp_path / "engine" / "config.py").exists()
    assert not (tmp_path / "engine" / "tracing.py").exists()


def test_without_git_history_there_is_no_untraced_build(tmp_path: Path) -> None:
    assert untraced_commit(tmp_path) is None


def test_the_variants_take_turns() -> None:
    assert order(0) == list(VARIANTS) and order(1) == list(reversed(VARIANTS))
