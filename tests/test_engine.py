"""`seckill run` end to end against the real Redis, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeout
from support import (
    SECKILL,
    EngineProcess,
    EventTap,
    add_products,
    announce,
    engine_env,
    free_port,
    log_rows,
    pending_count,
    push_orders,
    service_command,
    table_locked,
    wait_for,
)

from bench.enginerun import cpu_seconds
from engine.catalog import Catalog
from engine.connections import connect_redis
from engine.errors import DatabaseFailed
from engine.keys import GROUP, Keys
from engine.orders import Entry
from engine.reader import delivery_counts
from engine.settle import record_errors
from engine.worker import EXIT_BOOT, EXIT_CRASH, Worker, consumer_name

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def redis(settings):
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys(settings) -> Keys:
    return Keys(settings.key_prefix)


async def row_count(settings, pids) -> int:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM seckill_logs WHERE product_id = ANY($1::bigint[])", pids)
    finally:
        await conn.close()


async def all_done(settings, redis, keys, pids, total) -> bool:
    return (await row_count(settings, pids) == total
            and await pending_count(redis, keys, pids) == 0)


def assert_one_id_per_order(rows, events, orders: int) -> None:
    """One row per order, one distinct instance ID per order, every event carries it."""
    assert len(rows) == orders
    by_stream = {(r["product_id"], r["stream_id"]): r["instance_id"] for r in rows}
    assert len(by_stream) == orders
    assert len(set(by_stream.values())) == orders
    seen = set()
    for e in events:
        key = (e.product_id, e.stream_id)
        assert by_stream[key] == e.instance_id, "an event carried a second instance ID"
        seen.add(key)
    assert seen == set(by_stream), "some logged orders were never published"


async def test_50k_orders_three_products_two_workers(settings, redis, keys, product_ids):
    pids = product_ids[:3]
    await add_products(settings, pids)
    for pid in pids:
        await announce(redis, keys, pid)
    sizes = [16_667, 16_667, 16_666]
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2)
        try:
            for pid, n in zip(pids, sizes, strict=True):
                await push_orders(redis, keys, pid, range(1, n + 1))
            await wait_for(lambda: all_done(settings, redis, keys, pids, 50_000), 180,
                           "50,000 orders logged and acknowledged")
            events = await tap.collect(50_000, timeout=60)
        finally:
            engine.stop()
    rows = await log_rows(settings, pids)
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], 50_000)
    assert all(r["status"] == "PROCESSING" for r in rows)
    for pid, n in zip(pids, sizes, strict=True):
        mine = [r for r in rows if r["product_id"] == pid]
        assert sorted(r["slot"] for r in mine) == list(range(1, n + 1))
        groups = await redis.xinfo_groups(keys.stream(pid))
        assert groups[0]["pending"] == 0 and groups[0]["lag"] == 0
    e = events[0]
    assert e.event_type == 1 and e.name.startswith("GPU instance") and e.spec.gpu == "A100"
    assert engine.wait(1) == 0


async def test_event_properties_follow_the_contract(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=1)
        try:
            await push_orders(redis, keys, product_id, [77])
            await tap.collect(1, timeout=30)
        finally:
            engine.stop()
    props, event = tap.events[0]
    assert props.delivery_mode == 2
    assert props.content_type == "application/x-protobuf"
    assert props.message_type == "INSTANCE_CREATED"
    assert props.message_id == str(event.instance_id)
    assert abs(props.timestamp.timestamp() - time.time()) < 120
    assert event.user_id == 77 and event.slot == 1 and event.sale_id == "sale-1"
    assert event.timestamp > 1_700_000_000


async def test_hand_added_entry_in_the_seed_form(settings, redis, keys, product_id):
    """`XADD stream:seckill:{1001} * uid 123 ts 1234567890` with no sale opened."""
    await add_products(settings, [product_id])
    engine = EngineProcess(settings, workers=1)
    try:
        await redis.execute_command("XADD", keys.stream(product_id), "*", "uid", "123",
                                    "ts", "1234567890")
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 1), 30,
                       "the hand-added order")
    finally:
        engine.stop()
    (row,) = await log_rows(settings, [product_id])
    assert row["user_id"] == 123 and row["sale_id"] is None and row["slot"] is None


async def test_poison_entries_are_dead_lettered_while_good_orders_flow(
        settings, redis, keys, product_ids):
    good, unknown = product_ids[:2]
    await add_products(settings, [good])
    for pid in (good, unknown):
        await announce(redis, keys, pid)
    stream = keys.stream(good)
    engine = EngineProcess(settings, workers=2)
    try:
        await push_orders(redis, keys, good, range(1, 501))
        # the first holder of unit 7 must be logged before the second claim arrives
        await wait_for(lambda: all_done(settings, redis, keys, [good], 500), 60, "first wave")
        poison = {
            await redis.xadd(stream, {"ts": "1"}): ("bad_entry", "uid missing"),
            await redis.xadd(stream, {"uid": "abc"}): ("bad_entry",
                                                       "uid is not a positive int64"),
            await redis.xadd(stream, {"uid": "5", "blob": "x" * 5000}): ("oversized", None),
            await redis.xadd(stream, {"uid": "9999", "sale": "sale-1", "slot": "7"}):
                ("slot_conflict", "unit 7 of sale sale-1 is already sold"),
            await redis.xadd(keys.stream(unknown), {"uid": "1"}): ("unknown_product", None),
        }
        await push_orders(redis, keys, good, range(501, 1001), first_slot=501)

        async def settled() -> bool:
            dead = await redis.xlen(keys.dlq(good)) + await redis.xlen(keys.dlq(unknown))
            return dead == 5 and await all_done(settings, redis, keys, [good, unknown], 1000)
        await wait_for(settled, 60, "good orders logged and poison dead-lettered")
    finally:
        engine.stop()
    letters = await redis.xrange(keys.dlq(good)) + await redis.xrange(keys.dlq(unknown))
    by_id = {f[b"id"]: f for _, f in letters}
    assert set(by_id) == set(poison)
    for entry_id, (reason, detail) in poison.items():
        f = by_id[entry_id]
        assert f[b"reason"].decode() == reason
        if detail:
            assert f[b"detail"].decode().startswith(detail)
        assert isinstance(orjson.loads(f[b"fields"]), dict)
    assert engine.output().count("Traceback") == 0


async def test_entries_delivered_too_often_are_dead_lettered(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    ids = await push_orders(redis, keys, product_id, range(1, 4))
    consumer = consumer_name(0)
    for _ in range(6):  # a worker that keeps dying on these entries
        await redis.xreadgroup(GROUP, consumer, {keys.stream(product_id): "0"})
        if _ == 0:
            await redis.xreadgroup(GROUP, consumer, {keys.stream(product_id): ">"})
    from engine.orders import Entry
    from engine.settle import record_errors

    stream = keys.stream(product_id).encode()
    await record_errors(redis, keys, [Entry(stream, ids[0], {})], "RuntimeError: boom")
    engine = EngineProcess(settings, workers=1, max_deliveries=3)
    try:
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 3), 30, "3 dead letters")
        await wait_for(lambda: _zero_pending(redis, keys, product_id), 10, "no pending")
    finally:
        engine.stop()
    letters = await redis.xrange(keys.dlq(product_id))
    assert {f[b"id"].decode() for _, f in letters} == set(ids)
    assert {f[b"reason"] for _, f in letters} == {b"too_many_deliveries"}
    first = next(f for _, f in letters if f[b"id"].decode() == ids[0])
    assert first[b"detail"].endswith(b"; last error: RuntimeError: boom")
    assert first[b"last_error"] == b"RuntimeError: boom"


async def test_janitor_reclaims_from_a_dead_consumer_and_dead_letters_poison(
        settings, redis, keys, product_id):
    """Entries pending on a consumer that is gone (a host that died, a slot that was
    scaled away) are processed by the janitor; one delivered too often is dead-lettered."""
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    stream = keys.stream(product_id)
    good = await push_orders(redis, keys, product_id, range(1, 51))
    poison = (await redis.xadd(stream, {"uid": "999", "ts": "1"})).decode()
    await redis.xreadgroup(GROUP, "gone-host-7", {stream: ">"})
    for _ in range(3):  # the dead consumer kept dying on this one
        await redis.xclaim(stream, GROUP, "gone-host-7", 0, [poison])
    await record_errors(redis, keys, [Entry(stream.encode(), poison, {})], "RuntimeError: boom")
    engine = EngineProcess(settings, workers=1, claim_idle_ms=1000, janitor_interval=0.5,
                           max_deliveries=4)
    try:
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], len(good)), 60,
                       "the dead consumer's entries reclaimed and processed")
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 1), 30, "the poison entry")
    finally:
        engine.stop()
    (_, letter), = await redis.xrange(keys.dlq(product_id))
    assert letter[b"id"].decode() == poison
    assert letter[b"reason"] == b"too_many_deliveries"
    assert letter[b"last_error"] == b"RuntimeError: boom"
    assert letter[b"detail"].endswith(b"; last error: RuntimeError: boom")
    assert {r["stream_id"] for r in await log_rows(settings, [product_id])} == set(good)
    assert "reclaimed" in engine.output()


async def test_delivery_counts_are_found_among_other_pending_entries(redis, keys, product_id):
    """The consumer's pending list between two IDs may hold many other entries."""
    await announce(redis, keys, product_id)
    stream = keys.stream(product_id)
    ids = await push_orders(redis, keys, product_id, range(1, 301))
    await redis.xreadgroup(GROUP, "c1", {stream: ">"})
    for _ in range(2):
        await redis.xclaim(stream, GROUP, "c1", 0, [ids[0], ids[-1]])
    asked = [ids[0].encode(), ids[-1].encode()]
    assert await delivery_counts(redis, stream.encode(), asked, "c1") == dict.fromkeys(asked, 3)


async def _xlen(redis, key, n) -> bool:
    return await redis.xlen(key) == n


async def _zero_pending(redis, keys, pid) -> bool:
    return await pending_count(redis, keys, [pid]) == 0


async def test_kill_9_a_worker_loses_nothing(settings, redis, keys, product_ids):
    pids = product_ids[:2]
    await add_products(settings, pids)
    for pid in pids:
        await announce(redis, keys, pid)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=200, claim_idle_ms=3000)
        try:
            for pid in pids:
                await push_orders(redis, keys, pid, range(1, 15_001))
            await wait_for(lambda: _rows_at_least(settings, pids, 3000), 60, "work under way")
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


async def _rows_at_least(settings, pids, n) -> bool:
    return await row_count(settings, pids) >= n


async def _replaced(engine: EngineProcess, victim: int) -> bool:
    kids = engine.children()
    return len(kids) == 2 and victim not in kids


async def test_broker_and_database_restarts_are_survived(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=100, publish_timeout=3,
                               db_timeout=3, retry_backoff_max=1)
        try:
            await push_orders(redis, keys, product_id, range(1, 5001))
            await wait_for(lambda: _rows_at_least(settings, [product_id], 500), 60, "progress")
            service_command("rabbitmqctl", "-q", "stop_app")
            try:
                await push_orders(redis, keys, product_id, range(5001, 10_001),
                                  first_slot=5001)
                # the failing batches say why, for the dead letter they might become
                await wait_for(lambda: _has_errors(redis, keys, product_id), 30,
                               "an error recorded for the entries held")
            finally:
                service_command("rabbitmqctl", "-q", "start_app")
            await wait_for(lambda: _rows_at_least(settings, [product_id], 7000), 90,
                           "progress after the broker came back")
            version = os.listdir("/etc/postgresql")[0]
            service_command("pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                            "restart")
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


async def test_sigterm_drains_and_exits_zero(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    await push_orders(redis, keys, product_id, range(1, 30_001))
    engine = EngineProcess(settings, workers=2, graceful_timeout=10)
    await wait_for(lambda: _rows_at_least(settings, [product_id], 2000), 60, "work under way")
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
        await wait_for(lambda: _kids(engine, 1), 20, "one worker")
        engine.signal(signal.SIGTTIN)
        await wait_for(lambda: _kids(engine, 2), 20, "two workers after SIGTTIN")
        before = set(engine.children())
        await push_orders(redis, keys, product_id, range(1, 20_001))
        engine.signal(signal.SIGHUP)
        await wait_for(lambda: _all_new(engine, before), 40, "workers replaced after SIGHUP")
        engine.signal(signal.SIGTTOU)
        await wait_for(lambda: _kids(engine, 1), 30, "one worker after SIGTTOU")
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 20_000), 90,
                       "every order across the reload")
    finally:
        engine.stop()
    assert "reload done" in engine.output()


async def _kids(engine: EngineProcess, n: int) -> bool:
    return len(engine.children()) == n


async def _all_new(engine: EngineProcess, before: set[int]) -> bool:
    kids = set(engine.children())
    return len(kids) == 2 and not kids & before and "reload done" in engine.output()


async def test_hung_worker_is_killed_and_replaced(settings, product_id):
    engine = EngineProcess(settings, workers=1, heartbeat_timeout=2)
    try:
        await wait_for(lambda: _kids(engine, 1), 20, "one worker")
        await asyncio.sleep(1)
        (victim,) = engine.children()
        os.kill(victim, signal.SIGSTOP)
        await wait_for(lambda: _replaced_one(engine, victim), 30, "the hung worker replaced")
    finally:
        engine.stop()
    assert "silent for" in engine.output()


async def _replaced_one(engine: EngineProcess, victim: int) -> bool:
    kids = engine.children()
    return len(kids) == 1 and kids[0] != victim


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


async def test_metrics_health_and_readiness(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    port = free_port()
    engine = EngineProcess(settings, workers=2, metrics_port=port)
    try:
        await push_orders(redis, keys, product_id, range(1, 1001))
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 1000), 60, "orders")
        await wait_for(lambda: _http_ok(port, "/healthz"), 20, "/healthz")
        await wait_for(lambda: _workers_reported(port, 2), 20, "2 workers in /healthz")
        ready = json.loads(_get(port, "/readyz"))
        assert ready == {"ready": True, "services": {"redis": "ok", "rabbitmq": "ok",
                                                     "postgresql": "ok"}}
        text = _get(port, "/metrics")
    finally:
        engine.stop()
    samples = collections.Counter(line.split("{")[0].split(" ")[0] for line in text.splitlines()
                                  if line and not line.startswith("#"))
    assert "seckill_orders_processed_total" in samples
    processed = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("seckill_orders_processed_total"))
    assert processed == 1000
    assert f'seckill_stream_lag{{product="{product_id}"}} 0.0' in text
    assert f'seckill_stream_pending{{product="{product_id}"}} 0.0' in text
    assert "seckill_order_latency_seconds_bucket" in text
    assert "guest:guest" not in text and "postgres@" not in text


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


async def _workers_reported(port: int, n: int) -> bool:
    return json.loads(_get(port, "/healthz"))["workers"] == n


async def _http_ok(port: int, path: str) -> bool:
    try:
        _get(port, path)
        return True
    except OSError:
        return False


# -- discovery, idling, signals ------------------------------------------------


async def test_a_sale_opened_while_running_is_picked_up(settings, redis, keys, product_id):
    """No restart: discovery (not the janitor's scan, kept out of the way) finds the sale."""
    await add_products(settings, [product_id])
    engine = EngineProcess(settings, workers=2, discovery_interval=0.5, janitor_interval=600)
    try:
        await wait_for(lambda: engine.booted(2), 30, "two booted workers")
        opened = subprocess.run([SECKILL, "sale", "open", "--product", str(product_id),
                                 "--stock", "100"], env=engine_env(settings),
                                capture_output=True, text=True, timeout=60)
        assert opened.returncode == 0, opened.stderr
        await push_orders(redis, keys, product_id, range(1, 101))
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 100), 30,
                       "the new sale's orders")
    finally:
        engine.stop()
    assert len(await log_rows(settings, [product_id])) == 100


async def test_an_idle_engine_does_not_spin(settings):
    """No sale at all: the worker waits for one instead of looping over empty reads."""
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: engine.booted(1), 30, "a booted worker")
        (pid,) = engine.children()
        before = cpu_seconds(pid)
        await asyncio.sleep(2)
        used = cpu_seconds(pid) - before
    finally:
        engine.stop()
    assert used < 0.5, f"an idle worker used {used:.2f} s of CPU in 2 s"


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
            await wait_for(lambda: _rows_at_least(settings, [product_id], 2000), 60,
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


async def test_dead_letters_stay_claimed_while_the_lookup_is_retried(
        settings, redis, keys, product_id):
    """A batch retrying its product lookup keeps its dead letters claimed too, so the
    janitor does not take them and dead-letter them a second time."""
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    engine = EngineProcess(settings, workers=1, db_timeout=0.5, retry_backoff_max=0.3,
                           claim_idle_ms=2000, janitor_interval=0.5)
    try:
        await wait_for(lambda: engine.booted(1), 30, "a booted worker")
        async with table_locked(settings.pg_dsn, "products", "ACCESS EXCLUSIVE"):
            await push_orders(redis, keys, product_id, range(1, 21))
            await redis.xadd(keys.stream(product_id), {"ts": "1"})  # no uid: a dead letter
            await asyncio.sleep(6)  # three times claim_idle_ms of lookups failing
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 20), 60,
                       "orders once the lookup works again")
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 1), 30, "the dead letter")
        await asyncio.sleep(1)
    finally:
        engine.stop()
    letters = await redis.xrange(keys.dlq(product_id))
    assert [f[b"reason"] for _, f in letters] == [b"bad_entry"]


# -- the worker itself, in this process, on the real services ------------------


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
    """Not only outages: a bug at boot gives EXIT_BOOT too, so the supervisor halts."""
    code = await asyncio.wait_for(_BuggyBoot(settings, slot=0).run(), 60)
    assert code == EXIT_BOOT
    assert not [k async for k in redis.scan_iter(match=keys.node(0)[:-1] + "*")], \
        "the node lease was not released"


async def test_a_dead_background_task_stops_the_worker(settings):
    worker = _StatusDies(settings.replace(graceful_timeout=5), slot=0)
    assert await asyncio.wait_for(worker.run(), 60) == EXIT_CRASH


def test_a_sigterm_before_the_loop_runs_is_not_lost(settings):
    """A SIGTERM that reaches a fresh worker before its loop exists must still stop it,
    not the supervisor's handler the child inherited."""
    script = textwrap.dedent("""
        import os, signal, sys
        from engine import worker
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
