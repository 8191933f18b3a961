"""A worker that cannot boot, or whose background task dies, exits with its code;
the supervisor halts instead of looping."""

from __future__ import annotations

import asyncio

import pytest

from engine import exits
from engine.process.worker import Worker
from engine.testing.processes import EngineProcess

pytestmark = pytest.mark.timeout(300)


def test_boot_failure_halts_instead_of_looping(settings):
    bad = settings.pg_dsn.replace(":5432/", ":1/")
    engine = EngineProcess(settings, workers=1, pg_dsn=bad, boot_timeout=1,
                           max_boot_failures=2)
    try:
        code = engine.wait(60)
    finally:
        engine.stop()
    out = engine.output()
    assert code == 3, out
    assert "failed to boot 2 times" in out
    assert out.count("spawned worker 0") == 2


class _BuggyBoot(Worker):
    async def boot(self) -> None:
        await super().boot()
        raise KeyError("a bug, not an outage")


class _StatusDies(Worker):
    async def boot(self) -> None:
        await super().boot()

        async def die(stopping: asyncio.Event) -> None:
            raise RuntimeError("status consumer bug")

        self.status.run = die  # type: ignore[method-assign]


async def test_any_boot_failure_exits_with_the_boot_code(settings, redis, keys):
    """Not only outages: a bug at boot gives exits.BOOT too, so the supervisor halts."""
    code = await asyncio.wait_for(_BuggyBoot(settings, slot=0).run(), 60)
    assert code == exits.BOOT
    assert not [k async for k in redis.scan_iter(match=keys.node(0)[:-1] + "*")], \
        "the node lease was not released"


async def test_a_dead_background_task_stops_the_worker(settings):
    worker = _StatusDies(settings.replace(graceful_timeout=5), slot=0)
    assert await asyncio.wait_for(worker.run(), 60) == exits.FAILED
