"""Stage 5 of a batch: acknowledge what is done and set aside what never will be.

Dead letters are written and their entries acknowledged in the same
MULTI/EXEC as the batch's acknowledgements, so an entry is never both gone
from the pending list and missing from the dead-letter stream.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import orjson
from redis.asyncio import Redis

from .keys import DLQ_SUFFIX, GROUP
from .orders import DeadLetter, Order


def dlq_fields(dead: DeadLetter, worker: str) -> dict[str, str | bytes]:
    """The dead-letter entry: the original ID and fields, why, who and when."""
    raw = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
           for k, v in dead.fields.items()}
    out: dict[str, str | bytes] = {
        "id": dead.stream_id,
        "reason": dead.reason,
        "detail": dead.detail,
        "fields": orjson.dumps(raw),
        "worker": worker,
        "at": str(int(time.time() * 1000)),
    }
    out.update(dead.extra)
    return out


def group_ids(items: Iterable[Order | DeadLetter]) -> dict[bytes, list[str]]:
    by_stream: dict[bytes, list[str]] = defaultdict(list)
    for item in items:
        by_stream[item.stream].append(item.entry_id)
    return by_stream


async def settle(redis: Redis, done: list[Order], dead: list[DeadLetter], worker: str) -> None:
    """XADD the dead letters and XACK everything in one transaction."""
    if not done and not dead:
        return
    pipe = redis.pipeline(transaction=True)
    for letter in dead:
        pipe.xadd(letter.stream + DLQ_SUFFIX.encode(), dlq_fields(letter, worker))  # type: ignore[arg-type]
    for stream, ids in group_ids([*done, *dead]).items():
        pipe.xack(stream, GROUP, *ids)
    await pipe.execute()


async def touch(redis: Redis, consumer: str, items: Iterable[Order | DeadLetter]) -> None:
    """Reset the idle time of entries we still work on, so no janitor takes them.

    XCLAIM ... JUSTID does not bump the delivery counter: a long broker
    outage must not make good orders look like poison.
    """
    pipe = redis.pipeline(transaction=False)
    for stream, ids in group_ids(items).items():
        pipe.xclaim(stream, GROUP, consumer, 0, list(ids), justid=True)  # type: ignore[arg-type]
    await pipe.execute()
