"""A supervisor killed with SIGKILL must not leave its workers running as orphans."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from support import add_products, all_done, announce, log_rows, push_orders, rows_at_least

from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

ORDERS = 20_000


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _all_gone(pids: list[int]) -> bool:
    return not any(running(pid) for pid in pids)


async def test_workers_of_a_killed_supervisor_exit_and_a_new_one_finishes(
        settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    await push_orders(redis, keys, product_id, range(1, ORDERS + 1))
    async with EventTap(settings.amqp_url) as tap:
        first = EngineProcess(settings, workers=2, batch_size=200, graceful_timeout=10,
                              heartbeat_timeout=5)
        orphans: list[int] = []
        try:
            await wait_for(lambda: first.booted(2), 60, "two booted workers")
            await wait_for(lambda: rows_at_least(settings, [product_id], 2000), 60,
                           "work under way")
            orphans = first.children()
            assert len(orphans) == 2
            first.signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            # a heartbeat (1 s here) to notice, then at most the graceful timeout to drain
            await wait_for(lambda: _all_gone(orphans), 30, "the orphaned workers to exit")
        finally:
            for pid in orphans:  # without the fix they would outlive the test
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
            first.stop()
        assert first.output().count("is gone; draining and exiting") == 2
        second = EngineProcess(settings, workers=2, batch_size=200)
        try:
            await wait_for(lambda: all_done(settings, redis, keys, [product_id], ORDERS), 120,
                           "every order after the new supervisor started")
            events = await tap.collect(ORDERS, timeout=60)
        finally:
            second.stop()
    assert_one_id_per_order(await log_rows(settings, [product_id]), events, ORDERS)
