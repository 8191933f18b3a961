"""Redelivery bookkeeping: why an entry failed, how often it was delivered, and poison.

Nothing is acknowledged before its row is committed and its event confirmed, so an
entry a worker could not finish stays pending and is delivered again: to the same
consumer when it re-reads its pending list, to another when the janitor claims it.
An entry that fails every time (a bug it triggers, a worker it kills) must not be
delivered forever: once delivered more than `max_deliveries` times it becomes a
`too_many_deliveries` dead letter that carries the last error recorded for it.

The errors live in one hash per product (`Keys.errors`), entry ID -> error, in the
product's hash slot: settle drops an entry's error in the same atomic step that
acknowledges it (`forget_errors`), so the hash only ever holds pending entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline as RedisPipeline

from engine.keys import GROUP, Keys
from engine.pipeline.orders import (
    TOO_MANY_DELIVERIES,
    DeadLetter,
    Entry,
    Order,
    ids_by_stream,
)

ERRORS_TTL_S = 86_400
MAX_ERROR_CHARS = 500


async def hold(redis: Redis, keys: Keys, consumer: str,
               items: Sequence[Order | DeadLetter], error: str) -> None:
    """Keep entries a batch still retries on `consumer`, and remember why they failed."""
    await touch(redis, consumer, items)
    await record_errors(redis, keys, items, error)


async def touch(redis: Redis, consumer: str, items: Iterable[Order | DeadLetter]) -> None:
    """Reset the idle time of entries we still work on, so no janitor takes them.

    XCLAIM ... JUSTID does not bump the delivery counter: a long broker
    outage must not make good orders look like poison.
    """
    pipe = redis.pipeline(transaction=False)
    for stream, ids in ids_by_stream(items).items():
        pipe.xclaim(stream, GROUP, consumer, 0, list(ids), justid=True)  # type: ignore[arg-type]
    await pipe.execute()


async def record_errors(redis: Redis, keys: Keys, items: Iterable[Order | DeadLetter | Entry],
                        error: str) -> None:
    """Remember why these entries failed, for the dead letter they may become."""
    pipe = redis.pipeline(transaction=False)
    for stream, ids in ids_by_stream(items).items():
        pid = keys.product_of_stream(stream.decode())
        if pid is not None:
            pipe.hset(keys.errors(pid), mapping=dict.fromkeys(ids, error[:MAX_ERROR_CHARS]))
            pipe.expire(keys.errors(pid), ERRORS_TTL_S)
    await pipe.execute()


def error_keys(keys: Keys, items: Iterable[Order | DeadLetter]) -> set[str]:
    """The error hashes that may hold entries of `items`, for `forget_errors`."""
    return {keys.errors(item.product_id) for item in items if item.product_id is not None}


def forget_errors(pipe: RedisPipeline, hashes: Iterable[str],
                  by_stream: dict[bytes, list[str]]) -> None:
    """Queue on `pipe`, the transaction that acknowledges the entries of `by_stream`,
    their removal from the error hashes: they will not be delivered again."""
    for key in hashes:
        pipe.hdel(key, *[i for ids in by_stream.values() for i in ids])


async def last_errors(redis: Redis, keys: Keys, stream: bytes,
                      ids: list[bytes]) -> dict[bytes, str]:
    """The error last recorded for each of `ids` that has one."""
    pid = keys.product_of_stream(stream.decode())
    if pid is None or not ids:
        return {}
    values = await redis.hmget(keys.errors(pid), ids)
    return {i: v.decode() if isinstance(v, bytes) else str(v)
            for i, v in zip(ids, values, strict=True) if v is not None}


async def too_often_delivered(redis: Redis, keys: Keys, stream: bytes, items: list,
                              consumer: str, limit: int) -> dict[bytes, DeadLetter]:
    """Dead letters for the entries of `items` (pending on `consumer`) delivered more
    than `limit` times, by entry ID; the others go on."""
    if not items:
        return {}
    counts = await delivery_counts(redis, stream, [raw_id for raw_id, _ in items], consumer)
    over = [(raw_id, fields) for raw_id, fields in items if counts.get(raw_id, 0) > limit]
    if not over:
        return {}
    errors = await last_errors(redis, keys, stream, [raw_id for raw_id, _ in over])
    return {raw_id: poison(keys, stream, raw_id, fields, counts[raw_id], errors.get(raw_id))
            for raw_id, fields in over}


async def delivery_counts(redis: Redis, stream: bytes, ids: list[bytes],
                          consumer: str) -> dict[bytes, int]:
    """Delivery count of each of `ids` (in stream order) pending on `consumer`.

    The consumer's pending list between the first and the last ID may hold other
    entries too (batches in flight, entries claimed earlier), so one page of
    len(ids) rows can stop short; we page on until every ID is found or the range
    is exhausted. Only recovery and the janitor call this, never the hot path.
    """
    if not ids:
        return {}
    wanted = set(ids)
    counts: dict[bytes, int] = {}
    page = len(ids) + 100
    low: bytes = ids[0]
    while True:
        rows: list[dict[str, Any]] = await redis.xpending_range(  # type: ignore[assignment]
            stream, GROUP, min=low, max=ids[-1], count=page, consumername=consumer)
        for row in rows:
            if row["message_id"] in wanted:
                counts[row["message_id"]] = int(row["times_delivered"])
        if len(rows) < page or len(counts) == len(wanted):
            return counts
        low = b"(" + rows[-1]["message_id"]


def poison(keys: Keys, stream: bytes, raw_id: bytes, fields: dict | None, deliveries: int,
           last_error: str | None = None) -> DeadLetter:
    """The `too_many_deliveries` dead letter of one entry."""
    detail = f"delivered {deliveries} times without being acknowledged"
    if last_error:
        detail += f"; last error: {last_error}"
    return DeadLetter(stream, raw_id.decode(), keys.product_of_stream(stream.decode()),
                      fields or {}, TOO_MANY_DELIVERIES, detail,
                      {"deliveries": str(deliveries), "last_error": last_error or ""})
