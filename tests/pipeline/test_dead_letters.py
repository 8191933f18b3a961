"""Bad entries go to the dead-letter stream with their reason and never block good ones."""

from __future__ import annotations

import re

import orjson
import pytest
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    pending_count,
    push_orders,
    table_locked,
)

from engine.keys import GROUP
from engine.pipeline.orders import Entry
from engine.pipeline.redelivery import delivery_counts, record_errors
from engine.process.worker import consumer_name
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for

RETRY_WAIT = re.compile(r"batch attempt \d+ failed, retrying in ([0-9.]+)s")

pytestmark = pytest.mark.timeout(300)


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
    from engine.pipeline.orders import Entry
    from engine.pipeline.redelivery import record_errors

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


def _retried_for(output: str) -> float:
    """Seconds a batch has spent waiting between failed attempts, by its own log."""
    return sum(float(s) for s in RETRY_WAIT.findall(output))


async def _xlen(redis, key, n) -> bool:
    return await redis.xlen(key) == n


async def _zero_pending(redis, keys, pid) -> bool:
    return await pending_count(redis, keys, [pid]) == 0


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

            async def failed_long_enough() -> bool:  # three times claim_idle_ms
                return _retried_for(engine.output()) >= 6.0
            await wait_for(failed_long_enough, 60, "6 s of failing lookups")
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 20), 60,
                       "orders once the lookup works again")
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 1), 30, "the dead letter")
    finally:
        engine.stop()  # drains: a janitor's batch still in flight would write its letter
    letters = await redis.xrange(keys.dlq(product_id))
    assert [f[b"reason"] for _, f in letters] == [b"bad_entry"]
