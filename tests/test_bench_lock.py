"""Two benchmarks at once wipe each other's database, vhost and keys between their
phases: the second one waits for the first, and says so."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HOLD = """
import sys, time
from bench.env import hold_bench_lock
hold_bench_lock(sys.argv[1], report_every=1.0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(lock: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_a_second_benchmark_waits_for_the_first(tmp_path: Path) -> None:
    lock = tmp_path / "bench.lock"
    first = _holder(lock, 3.0)
    assert first.stdout is not None and first.stdout.readline().strip() == "held"
    started = time.monotonic()
    second = _holder(lock, 0.0)
    out, _ = second.communicate(timeout=60)
    first.wait(timeout=30)
    assert "waiting for another benchmark to finish" in out
    assert f"pid {first.pid}" in out  # the holder is named
    assert out.strip().endswith("held")
    assert time.monotonic() - started > 1.0  # it did not run beside the first


def test_the_lock_is_free_once_its_holder_exits(tmp_path: Path) -> None:
    lock = tmp_path / "bench.lock"
    first = _holder(lock, 0.0)
    first.communicate(timeout=30)
    out, _ = _holder(lock, 0.0).communicate(timeout=30)
    assert out.strip() == "held"
