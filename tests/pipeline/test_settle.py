"""The common batch's acknowledgement: XACKs packed by hand, byte for byte what redis-py
packs, sent on a pooled connection of the real Redis, once more if that one was dropped."""

from __future__ import annotations

import pytest

from engine.keys import GROUP
from engine.pipeline.orders import Order
from engine.pipeline.reader import ensure_group
from engine.pipeline.settle import pack_xack, settle

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
