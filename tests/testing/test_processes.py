"""A `seckill` child: its workers read from /proc, its output kept, and in a session of
its own killed at once with every process it forked (the chaos suite's lost host)."""

from __future__ import annotations

import os
import signal

import pytest

from engine.testing.processes import EngineProcess, SeckillProcess, engine_env, pid_alive
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def gone(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


async def test_a_child_in_a_session_of_its_own_dies_with_all_it_forked(settings):
    engine = SeckillProcess(["run", "--workers", "2"], engine_env(settings), "engine",
                            session=True)
    try:
        await wait_for(lambda: engine.booted(2), 60, "two booted workers")
        workers = engine.children()
        assert len(workers) == 2 and os.getsid(workers[0]) == engine.pid
        engine.kill_all()
        await wait_for(lambda: gone(workers), 10, "every worker killed with its supervisor")
        assert engine.proc.returncode == -signal.SIGKILL
    finally:
        engine.stop()


async def test_an_engine_child_drains_on_stop_and_keeps_its_output(settings):
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: engine.booted(1), 60, "a booted worker")
        assert os.getsid(engine.pid) == os.getsid(0)  # our session: no session of its own
        with pytest.raises(ValueError, match="session"):
            engine.kill_all()
    finally:
        engine.stop()
    assert engine.proc.returncode == 0
    assert " booted as " in engine.output() and engine.log_path.exists()
