"""Redelivery bookkeeping against the real Redis: errors kept while an entry is pending,
delivery counts left alone by a retry, poison told apart, errors dropped on settling."""

from __future__ import annotations

from engine.keys import GROUP
from engine.pipeline.batches import Pipeline
from engine.pipeline.orders import TOO_MANY_DELIVERIES, Entry, Order
from engine.pipeline.reader import ensure_group
from engine.pipeline.redelivery import (
    delivery_counts,
    error_keys,
    hold,
    record_errors,
    too_often_delivered,
)
from engine.pipeline.settle import settle


async def pending(redis, keys, product_id, n: int) -> tuple[bytes, list]:
    """A stream with `n` entries delivered once each to consumer c1, as XREADGROUP gave them."""
    stream = keys.stream(product_id).encode()
    await ensure_group(redis, stream)
    for uid in range(1, n + 1):
        await redis.xadd(stream, {"uid": str(uid)})
    [(_, items)] = await redis.xreadgroup(GROUP, "c1", {stream: ">"})
    return stream, items


def order(product_id: int, stream: bytes, raw_id: bytes) -> Order:
    return Order(product_id, 1, raw_id.decode(), 1700000000, None, None, stream)


async def test_an_entry_delivered_too_often_is_poison_with_its_last_error(
        redis, keys, product_id):
    stream, items = await pending(redis, keys, product_id, 2)
    (bad, _), (good, _) = items
    for _ in range(2):  # delivered twice more: three deliveries in all
        await redis.xclaim(stream, GROUP, "c1", 0, [bad])
    await record_errors(redis, keys, [Entry(stream, bad.decode(), {})], "RuntimeError: boom")

    letters = await too_often_delivered(redis, keys, stream, items, "c1", limit=2)

    assert list(letters) == [bad]
    letter = letters[bad]
    assert letter.reason == TOO_MANY_DELIVERIES
    assert letter.detail == ("delivered 3 times without being acknowledged; "
                             "last error: RuntimeError: boom")
    assert letter.extra == {"deliveries": "3", "last_error": "RuntimeError: boom"}
    assert await too_often_delivered(redis, keys, stream, items, "c1", limit=3) == {}
    assert await delivery_counts(redis, stream, [bad, good], "c1") == {bad: 3, good: 1}


async def test_holding_a_retried_batch_records_why_and_keeps_its_delivery_count(
        redis, keys, product_id):
    stream, items = await pending(redis, keys, product_id, 2)
    held = [order(product_id, stream, raw_id) for raw_id, _ in items]

    await hold(redis, keys, "c1", held, "ServiceUnavailable: broker down")

    ids = [raw_id for raw_id, _ in items]
    assert await delivery_counts(redis, stream, ids, "c1") == dict.fromkeys(ids, 1)
    assert await redis.hgetall(keys.errors(product_id)) == dict.fromkeys(
        ids, b"ServiceUnavailable: broker down")


async def test_a_crashed_batch_leaves_its_error_for_the_dead_letter(
        settings, redis, keys, product_id):
    stream, items = await pending(redis, keys, product_id, 1)
    pipeline = Pipeline(settings=settings, keys=keys, redis=redis, pool=None, publisher=None,
                        catalog=None, snowflake=None, consumer="c1")
    entries = [Entry(stream, raw_id.decode(), fields) for raw_id, fields in items]

    await pipeline.record_crash(entries, KeyError("slot"))

    letters = await too_often_delivered(redis, keys, stream, items, "c1", limit=0)
    assert [letter.extra["last_error"] for letter in letters.values()] == ["KeyError: 'slot'"]


async def test_settling_drops_the_errors_of_the_entries_it_acknowledges(
        redis, keys, product_id):
    stream, items = await pending(redis, keys, product_id, 2)
    (done, _), (still, _) = items
    await record_errors(redis, keys, [Entry(stream, i.decode(), {}) for i in (done, still)],
                        "TimeoutError")
    acked = [order(product_id, stream, done)]

    await settle(redis, acked, [], "c1", error_keys(keys, acked))

    assert await redis.hkeys(keys.errors(product_id)) == [still]
    assert await delivery_counts(redis, stream, [done, still], "c1") == {still: 1}
