"""Workers killed, services restarted, commands that hang: nothing accepted is lost."""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg
import pytest
from redis.exceptions import TimeoutError as RedisTimeout
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    open_sales,
    push_orders,
    rows_at_least,
    table_locked,
)

from bench.enginerun import cpu_seconds
from engine.connections import connect_redis
from engine.errors import DatabaseFailed
from engine.keys import GROUP
from engine.pipeline.catalog import Catalog
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)


async def test_kill_9_a_worker_loses_nothing(settings, redis, keys, product_ids):
    pids = product_ids[:2]
    await open_sales(settings, redis, keys, pids)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=200, claim_idle_ms=3000)
        try:
            for pid in pids:
                await push_orders(redis, keys, pid, range(1, 15_001))
            await wait_for(lambda: rows_at_least(settings, pids, 3000), 60, "work under way")
            victims = engine.children()
            assert len(victims) == 2
            os.kill(victims[0], signal.SIGKILL)
            await wait_for(lambda: _replaced(engine, victims[0]), 30, "a replacement worker")
            await wait_for(lambda: all_done(settings, redis, keys, pids, 30_000), 120,
                           "all orders after the kill")
            events = await tap.collect(30_000, timeout=60)
        finally:
            engine.stop()
    rows = await log_rows(settings, pids)
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], 30_000)


async def _replaced(engine: EngineProcess, victim: int) -> bool:
    kids = engine.children()
    return len(kids) == 2 and victim not in kids


async def test_broker_and_database_restarts_are_survived(private_settings, private_rabbitmq,
                                                        private_postgres, private_redis_client,
                                                        keys, product_id):
    # the suite's own broker and database: stopping them must not disturb anyone else's run
    settings, redis = private_settings, private_redis_client
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=100, publish_timeout=3,
                               db_timeout=3, retry_backoff_max=1)
        try:
            await push_orders(redis, keys, product_id, range(1, 5001))
            await wait_for(lambda: rows_at_least(settings, [product_id], 500), 60, "progress")
            private_rabbitmq.stop_app()
            try:
                await push_orders(redis, keys, product_id, range(5001, 10_001),
                                  first_slot=5001)
                # the failing batches say why, for the dead letter they might become
                await wait_for(lambda: _has_errors(redis, keys, product_id), 30,
                               "an error recorded for the entries held")
            finally:
                private_rabbitmq.start_app()
            await wait_for(lambda: rows_at_least(settings, [product_id], 7000), 90,
                           "progress after the broker came back")
            private_postgres.restart()
            await push_orders(redis, keys, product_id, range(10_001, 12_001),
                              first_slot=10_001)
            await wait_for(lambda: all_done(settings, redis, keys, [product_id], 12_000), 120,
                           "all orders after both restarts")
            events = await tap.collect(12_000, timeout=60)
            # the workers rode out both outages: none crashed or was replaced
            assert " exited with " not in engine.output()
        finally:
            engine.stop()
    rows = await log_rows(settings, [product_id])
    assert_one_id_per_order(rows, events, 12_000)
    assert await redis.hlen(keys.errors(product_id)) == 0  # settled entries take theirs along


async def _has_errors(redis, keys, product_id) -> bool:
    return await redis.hlen(keys.errors(product_id)) > 0


async def test_hung_worker_is_killed_and_replaced(settings, product_id):
    engine = EngineProcess(settings, workers=1, heartbeat_timeout=2)
    try:
        # booted: its heartbeat runs, so a silence now is a hang, not a slow boot
        await wait_for(lambda: engine.booted(1), 20, "one booted worker")
        (victim,) = engine.children()
        os.kill(victim, signal.SIGSTOP)
        await wait_for(lambda: _replaced_one(engine, victim), 30, "the hung worker replaced")
    finally:
        engine.stop()
    assert "silent for" in engine.output()


async def _replaced_one(engine: EngineProcess, victim: int) -> bool:
    kids = engine.children()
    return len(kids) == 1 and kids[0] != victim


async def test_an_idle_engine_does_not_spin(settings):
    """No sale at all: the worker waits for one instead of looping over empty reads."""
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: engine.booted(1), 30, "a booted worker")
        (pid,) = engine.children()
        before = cpu_seconds(pid)
        await asyncio.sleep(2)  # the scenario: two seconds of an idle engine, measured
        used = cpu_seconds(pid) - before
    finally:
        engine.stop()
    assert used < 0.5, f"an idle worker used {used:.2f} s of CPU in 2 s"


async def test_redis_commands_cannot_hang_past_the_socket_timeout(settings, keys, product_id):
    s = settings.replace(block_ms=200, redis_timeout=0.5)
    client = await connect_redis(s)
    try:
        await announce(client, keys, product_id)
        # a blocking read within block_ms is not cut short...
        assert await client.xreadgroup(GROUP, "c1", {keys.stream(product_id): ">"},
                                       block=s.block_ms) == []
        # ...but a reply that never comes fails instead of hanging
        with pytest.raises(RedisTimeout):
            await asyncio.wait_for(client.blpop([keys.stock(product_id)], timeout=0), 30)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_stuck_product_lookup_fails_with_a_named_error(settings, product_id):
    await add_products(settings, [product_id])
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=2)
    try:
        async with table_locked(settings.pg_dsn, "products", "ACCESS EXCLUSIVE"):
            with pytest.raises(DatabaseFailed, match="no answer in time"):
                await asyncio.wait_for(Catalog(pool, 30, timeout=0.5).lookup([product_id]), 30)
        assert product_id in await Catalog(pool, 30, timeout=5).lookup([product_id])
    finally:
        await pool.close()
