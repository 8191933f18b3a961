"""The reader is chosen once, by the client, and the single-Redis reader recovers its own
pending entries before it reads new ones (the cluster reader: tests/cluster)."""

from __future__ import annotations

from redis.asyncio import RedisCluster

from engine.keys import GROUP
from engine.pipeline.autoreader import open_reader
from engine.pipeline.clusterreader import ClusterReader
from engine.pipeline.orders import TOO_MANY_DELIVERIES
from engine.pipeline.reader import NEW
from engine.pipeline.redisreader import RedisReader

OPTIONS = {"batch_size": 100, "block_ms": 50, "max_deliveries": 2}


async def test_the_reader_is_chosen_by_the_client(redis, keys):
    cluster = RedisCluster(host="127.0.0.1", port=1)  # never connected: nothing is sent
    assert type(open_reader(redis, keys, "c1", **OPTIONS)) is RedisReader
    assert type(open_reader(cluster, keys, "c1", **OPTIONS)) is ClusterReader


async def test_own_pending_entries_first_then_new_ones(redis, keys, product_id):
    stream = keys.stream(product_id)
    await redis.sadd(keys.streams, product_id)
    reader = open_reader(redis, keys, "c1", **OPTIONS)
    assert await reader.discover() == 1
    held = [await redis.xadd(stream, {"uid": str(n)}) for n in (1, 2)]
    await redis.xreadgroup(GROUP, "c1", {stream: ">"})  # a predecessor read them and died
    await redis.xclaim(stream, GROUP, "c1", 0, [held[0]])  # and died on the first twice

    entries, dead = await reader.read()  # cursor 0: the first is now delivered 3 times
    assert [e.stream_id.encode() for e in entries] == [held[1]]
    assert [(d.stream_id.encode(), d.reason) for d in dead] == [(held[0], TOO_MANY_DELIVERIES)]
    assert await reader.read() == ([], [])  # nothing else of ours: on to new entries
    assert reader.cursors == {stream.encode(): NEW}
    new = await redis.xadd(stream, {"uid": "3"})
    entries, dead = await reader.read()
    assert [e.stream_id.encode() for e in entries] == [new] and dead == []


async def test_a_group_gone_is_created_again(redis, keys, product_id):
    stream = keys.stream(product_id)
    await redis.sadd(keys.streams, product_id)
    reader = open_reader(redis, keys, "c1", **OPTIONS)
    await reader.discover()
    await redis.xgroup_destroy(stream, GROUP)

    assert await reader.read() == ([], [])
    assert [g["name"] for g in await redis.xinfo_groups(stream)] == [GROUP.encode()]


async def test_entries_read_raw_equal_redis_pys_own_parse(redis, keys, product_id):
    """The single-Redis reader takes XREADGROUP's reply as the parser gives it and makes
    each entry's dict itself: the same stream IDs and fields redis-py's callback makes."""
    stream = keys.stream(product_id)
    await redis.sadd(keys.streams, product_id)
    reader = open_reader(redis, keys, "c1", **OPTIONS)
    await reader.discover()
    await reader.read()  # nothing of ours pending: on to new entries
    added = [{b"uid": b"1", b"ts": b"2", b"sale": b"s", b"slot": b"3"},
             {b"uid": b"4", b"from": b"waitlist", b"tp": b"00-ab-cd-01"}, {b"x": b""}]
    ids = [await redis.xadd(stream, fields) for fields in added]
    entries, dead = await reader.read()
    assert dead == []
    assert [(e.stream, e.stream_id, e.fields) for e in entries] == [
        (stream.encode(), i.decode(), f) for i, f in zip(ids, added, strict=True)]
    assert all(type(e.fields) is dict for e in entries)
    # the same entries re-read from the pending list (cursor 0), one deleted meanwhile
    await redis.xdel(stream, ids[1])
    again = open_reader(redis, keys, "c1", **OPTIONS)
    await again.discover()
    entries, dead = await again.read()
    assert [(e.stream_id, e.fields) for e in entries] == [
        (ids[0].decode(), added[0]), (ids[2].decode(), added[2])]
    assert [(d.stream_id, d.reason) for d in dead] == [(ids[1].decode(), "deleted")]
