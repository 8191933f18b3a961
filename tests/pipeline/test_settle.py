"""Settling a batch on the real Redis: every stream's entries acknowledged and its dead
letters written in one transaction, however many sales the batch holds; the common
batch's acknowledgement packed by hand, byte for byte what redis-py packs, sent on a
pooled connection, once more if that one was dropped."""

from __future__ import annotations

import random

import pytest

from engine.keys import DLQ_SUFFIX, GROUP
from engine.pipeline.orders import DeadLetter, Order
from engine.pipeline.reader import ensure_group
from engine.pipeline.settle import ACK_STREAMS, ack_args, pack_ack, pack_xack, settle


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

STREAMS = [b"s", b"seckill:{42}:orders", "é:{1}".encode()]
IDS = [[], ["1-0"], ["1765000000000-0", "1765000000000-12", "9-99999999999"],
       [f"1765000000{n:03d}-{n}" for n in range(600)]]  # past redis-py's 6,000-byte chunks


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("ids", IDS, ids=len)
def test_pack_xack_is_what_redis_py_packs(redis, stream, ids):
    theirs = b"".join(redis.connection_pool.make_connection().pack_command(
        "XACK", stream, GROUP, *ids))
    assert pack_xack(stream, ids) == theirs


async def _pending(redis, stream: bytes, n: int) -> list[str]:
    await ensure_group(redis, stream)
    for uid in range(n):
        await redis.xadd(stream, {"uid": str(uid + 1)})
    [(_, items)] = await redis.xreadgroup(GROUP, "c1", {stream: ">"})
    return [raw_id.decode() for raw_id, _ in items]


def _orders(stream: bytes, ids: list[str]) -> list[Order]:
    return [Order(1, 1, i, 1700000000, None, None, stream) for i in ids]


async def test_a_batch_without_dead_letters_is_acknowledged_on_every_stream(redis, keys):
    streams = [keys.stream(p).encode() for p in (1, 2)]
    done = [o for s in streams for o in _orders(s, await _pending(redis, s, 3))]
    await settle(redis, done, [], "c1")
    for s in streams:
        assert (await redis.xpending(s, GROUP))["pending"] == 0
    assert await redis.ping()  # every reply was read: the pooled connection is clean


async def test_a_connection_dropped_in_the_pool_is_replaced(redis, keys):
    stream = keys.stream(3).encode()
    ids = await _pending(redis, stream, 2)
    name = f"settle-test-{id(stream)}"
    await redis.client_setname(name)  # on the one connection the pool holds now
    [mine] = [c["id"] for c in await redis.client_list() if c["name"] == name]
    assert await redis.execute_command("CLIENT KILL ID", mine, "SKIPME", "no") == 1
    await settle(redis, _orders(stream, ids), [], "c1")
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


@pytest.mark.parametrize("sizes", [(1, 2), (3, 0, 600), (1,) * 40], ids=len)
def test_pack_ack_of_many_streams_is_redis_py_s_eval(redis, sizes):
    by_stream = {f"seckill:{{{n}}}:orders".encode(): [f"17650000{n:05d}-{k}" for k in range(size)]
                 for n, size in enumerate(sizes)}
    theirs = b"".join(redis.connection_pool.make_connection().pack_command(
        "EVAL", ACK_STREAMS, len(by_stream), *by_stream, *ack_args(by_stream)))
    assert pack_ack(by_stream) == theirs


async def test_a_batch_of_many_streams_without_dead_letters_is_acknowledged(redis, keys):
    pids = random.sample(range(10**9, 9 * 10**9), 3)
    streams = [keys.stream(pid).encode() for pid in pids]
    ids = [await delivered(redis, s, n) for s, n in zip(streams, (2, 1203, 1), strict=True)]
    done = [Order(pid, 1, i.decode(), 1, None, None, s)
            for pid, s, its in zip(pids, streams, ids, strict=True) for i in its]
    await settle(redis, done, [], "c1")
    assert [(await redis.xpending(s, GROUP))["pending"] for s in streams] == [0, 0, 0]
    assert await redis.ping()  # its one reply was read: the pooled connection is clean
