"""The supervisor's signals: TERM drains, QUIT is fast, TTIN/TTOU resize, HUP reloads."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    pending_count,
    push_orders,
    row_count,
    rows_at_least,
    table_locked,
    workers_are,
)

from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess, engine_env
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)


async def test_sigterm_drains_and_exits_zero(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    await push_orders(redis, keys, product_id, range(1, 30_001))
    engine = EngineProcess(settings, workers=2, graceful_timeout=10)
    await wait_for(lambda: rows_at_least(settings, [product_id], 2000), 60, "work under way")
    started = time.monotonic()
    engine.signal(signal.SIGTERM)
    assert engine.wait(15) == 0
    assert time.monotonic() - started < 12
    assert await pending_count(redis, keys, [product_id]) == 0
    logged = await row_count(settings, [product_id])
    groups = await redis.xinfo_groups(keys.stream(product_id))
    assert groups[0]["lag"] == 30_000 - logged  # read == logged == acknowledged
    engine.stop()
    await _restart_until_done(settings, redis, keys, product_id, 30_000, workers=2)


async def test_ttin_ttou_and_hup(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: workers_are(engine, 1), 20, "one worker")
        engine.signal(signal.SIGTTIN)
        await wait_for(lambda: workers_are(engine, 2), 20, "two workers after SIGTTIN")
        before = set(engine.children())
        await push_orders(redis, keys, product_id, range(1, 20_001))
        engine.signal(signal.SIGHUP)
        await wait_for(lambda: _all_new(engine, before), 40, "workers replaced after SIGHUP")
        engine.signal(signal.SIGTTOU)
        await wait_for(lambda: workers_are(engine, 1), 30, "one worker after SIGTTOU")
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 20_000), 90,
                       "every order across the reload")
    finally:
        engine.stop()
    assert "reload done" in engine.output()


async def _all_new(engine: EngineProcess, before: set[int]) -> bool:
    kids = set(engine.children())
    return len(kids) == 2 and not kids & before and "reload done" in engine.output()


async def test_sigquit_exits_fast_and_held_entries_are_processed_next_start(
        settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    await push_orders(redis, keys, product_id, range(1, 2001))
    # a stuck database: batches are held, unlogged, so a graceful stop would wait for them
    code, out = await _signal_while_stuck(settings, redis, keys, product_id, signal.SIGQUIT,
                                          workers=2, graceful_timeout=120,
                                          wait=30)  # far less than graceful_timeout
    assert code == 0, out
    assert await pending_count(redis, keys, [product_id]) > 0
    await _restart_until_done(settings, redis, keys, product_id, 2000, workers=2)
    rows = await log_rows(settings, [product_id])
    assert len({r["instance_id"] for r in rows}) == len(rows) == 2000


async def _signal_while_stuck(settings, redis, keys, pid, sig, *, workers: int,
                              graceful_timeout: float, wait: float) -> tuple[int, str]:
    """Start the engine with seckill_logs locked, so it reads entries and holds them
    unlogged; send `sig`; (exit code, output) once it has exited."""
    async with table_locked(settings.pg_dsn, "seckill_logs"):
        engine = EngineProcess(settings, workers=workers, graceful_timeout=graceful_timeout,
                               db_timeout=60)
        try:
            await wait_for(lambda: _pending_at_least(redis, keys, pid, 1), 30,
                           "entries read and held")
            engine.signal(sig)
            code = await asyncio.to_thread(engine.wait, wait)
        finally:
            engine.stop()
    return code, engine.output()


async def _restart_until_done(settings, redis, keys, pid, total: int, *, workers: int) -> None:
    """A new engine finishes what the last one left pending."""
    engine = EngineProcess(settings, workers=workers)
    try:
        await wait_for(lambda: all_done(settings, redis, keys, [pid], total), 90,
                       "the rest after a restart")
    finally:
        engine.stop()


async def _pending_at_least(redis, keys, pid, n) -> bool:
    return await pending_count(redis, keys, [pid]) >= n


async def test_sigterm_with_stuck_batches_exits_within_the_graceful_timeout(
        settings, redis, keys, product_id):
    """Draining gives up in time and closing the connections cannot push the worker
    past `graceful_timeout`: it exits on its own, never SIGKILLed by the supervisor."""
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    await push_orders(redis, keys, product_id, range(1, 501))
    code, out = await _signal_while_stuck(settings, redis, keys, product_id, signal.SIGTERM,
                                          workers=1, graceful_timeout=6, wait=60)
    assert code == 0, out
    assert "batches left pending at shutdown" in out
    assert "did not stop in time" not in out
    await _restart_until_done(settings, redis, keys, product_id, 500, workers=1)


async def test_sighup_keeps_one_instance_id_and_one_event_per_order(
        settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=200)
        try:
            await wait_for(lambda: engine.booted(2), 30, "two booted workers")
            before = set(engine.children())
            await push_orders(redis, keys, product_id, range(1, 20_001))
            await wait_for(lambda: rows_at_least(settings, [product_id], 2000), 60,
                           "work under way")
            engine.signal(signal.SIGHUP)
            await wait_for(lambda: _all_new(engine, before), 60, "workers replaced")
            await wait_for(lambda: all_done(settings, redis, keys, [product_id], 20_000), 120,
                           "every order across the reload")
            events = await tap.collect(20_000, timeout=60)
        finally:
            engine.stop()
    assert_one_id_per_order(await log_rows(settings, [product_id]), events, 20_000)
    assert len(events) == 20_000, "a graceful reload published some order twice"


def test_a_sigterm_before_the_loop_runs_is_not_lost(settings):
    """A SIGTERM that reaches a fresh worker before its loop exists must still stop it,
    not the supervisor's handler the child inherited."""
    script = textwrap.dedent("""
        import os, signal, sys
        from engine.process import worker
        from engine.config import load_settings

        original = worker.Worker.__init__

        def init(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # run_worker started, no loop yet
            original(self, *args, **kwargs)

        worker.Worker.__init__ = init
        signal.signal(signal.SIGTERM, lambda *_: None)  # the supervisor's, inherited
        sys.exit(worker.run_worker(load_settings(), 0))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=engine_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")
