"""Settling a batch on the real Redis: every stream's entries acknowledged and its dead
letters written in one transaction, however many sales the batch holds."""

from __future__ import annotations

import random

from engine.keys import DLQ_SUFFIX, GROUP
from engine.pipeline.orders import DeadLetter, Order
from engine.pipeline.reader import ensure_group
from engine.pipeline.settle import settle


async def delivered(redis, stream: bytes, n: int) -> list[bytes]:
    """`n` entries of `stream`, delivered to consumer c1."""
    await ensure_group(redis, stream)
    pipe = redis.pipeline(transaction=False)
    for uid in range(1, n + 1):
        pipe.xadd(stream, {"uid": str(uid)})
    await pipe.execute()
    [(_, items)] = await redis.xreadgroup(GROUP, "c1", {stream: ">"})
    return [raw_id for raw_id, _ in items]


async def test_a_batch_of_many_streams_is_acknowledged_stream_by_stream(redis, keys):
    pids = random.sample(range(10**9, 9 * 10**9), 3)
    streams = [keys.stream(pid).encode() for pid in pids]
    sizes = [1, 7, 1203]  # past the script's 500 IDs per XACK, twice
    ids = [await delivered(redis, s, n) for s, n in zip(streams, sizes, strict=True)]
    done = [Order(pid, 1, i.decode(), 1, None, None, s)
            for pid, s, its in zip(pids, streams, ids, strict=True) for i in its[:-1]]
    *_, kept = ids[2]  # left pending: not part of the batch
    dead = [DeadLetter(streams[1], ids[1][-1].decode(), pids[1], {b"uid": b"7"},
                       "bad_entry", "no ts")]

    await settle(redis, done, dead, "c1")

    pending = [(await redis.xpending(s, GROUP))["pending"] for s in streams]
    assert pending == [1, 0, 1]
    assert [r["message_id"] for r in await redis.xpending_range(
        streams[2], GROUP, min="-", max="+", count=10)] == [kept]
    [(_, letter)] = await redis.xrange(streams[1] + DLQ_SUFFIX.encode())
    assert (letter[b"id"], letter[b"reason"]) == (ids[1][-1], b"bad_entry")
