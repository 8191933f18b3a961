"""The janitor on a Redis Cluster: the first XAUTOCLAIM of every stream goes in one
pipeline, which the cluster client splits per node; every stream's entries come back."""

from __future__ import annotations

import random

import pytest

from engine.keys import GROUP, Keys
from engine.pipeline.janitor import Janitor
from engine.pipeline.reader import ensure_group

pytestmark = pytest.mark.timeout(120)


async def test_streams_of_many_slots_are_reclaimed(cluster_settings, cluster_redis):
    redis, keys = cluster_redis, Keys(cluster_settings.key_prefix)
    streams = [keys.stream(pid).encode() for pid in random.sample(range(10**9, 9 * 10**9), 40)]
    held = set()
    for n, stream in enumerate(streams):
        await ensure_group(redis, stream)
        for uid in range(n % 3):
            await redis.xadd(stream, {"uid": str(uid + 1), "ts": "1"})
        for _, items in await redis.xreadgroup(GROUP, "gone", {stream: ">"}) or []:
            held |= {(stream, raw_id) for raw_id, _ in items}
    janitor = Janitor(redis, keys, "me", idle_ms=0, count=10, max_deliveries=5)

    entries, dead = await janitor.reclaim(streams)

    assert dead == [] and len(held) == 39
    assert {(e.stream, e.stream_id.encode()) for e in entries} == held
