"""The janitor reclaims what a gone consumer left pending in many streams, on the real
Redis: one round trip for every stream's first page, a page more only where needed, and
a stream it cannot read does not hold up the others."""

from __future__ import annotations

import random

from support import count_commands

from engine.keys import GROUP
from engine.pipeline.janitor import Janitor
from engine.pipeline.reader import ensure_group


async def left_pending(redis, stream: bytes, n: int) -> list[bytes]:
    """`n` entries of `stream` read by consumer `gone`, which never acknowledges them."""
    await ensure_group(redis, stream)
    for uid in range(n):
        await redis.xadd(stream, {"uid": str(uid + 1), "ts": "1"})
    if not n:
        return []
    [(_, items)] = await redis.xreadgroup(GROUP, "gone", {stream: ">"})
    return [raw_id for raw_id, _ in items]


async def test_many_streams_are_reclaimed_in_one_round_trip_and_pages_where_needed(
        redis, keys):
    pids = random.sample(range(10**9, 9 * 10**9), 50)
    streams = [keys.stream(pid).encode() for pid in pids]
    held = {s: await left_pending(redis, s, n)
            for s, n in zip(streams, [25, 1, 15, *[0] * 47], strict=True)}
    await redis.xdel(streams[2], *held[streams[2]][:8])  # a page of 10 claims 2 of them
    lost = keys.stream(random.randrange(10**9, 9 * 10**9)).encode()  # no group: refused
    janitor = Janitor(redis, keys, "me", idle_ms=0, count=10, max_deliveries=5)
    sent = count_commands(redis)

    entries, dead = await janitor.reclaim([lost, *streams])

    assert dead == []
    got = {(e.stream, e.stream_id.encode()) for e in entries}
    assert got == {(streams[0], i) for i in held[streams[0]][:10]} | {
        (streams[1], held[streams[1]][0])} | {(streams[2], i) for i in held[streams[2]][8:]}
    # the first page of each in one pipeline, one page more of one stream, and the
    # delivery counts of the four pages that claimed something
    assert (sent["round trips"], sent["XAUTOCLAIM"], sent["XPENDING"]) == (6, 52, 4)
