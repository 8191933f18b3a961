"""The janitor deletes only consumers that hold nothing and are idle at the moment of
the delete, on the real Redis.

XGROUP DELCONSUMER drops the consumer's pending entries with it. A worker cut off from
Redis looks idle until the moment it reads a batch, so a delete decided on an older
XINFO dropped a batch just read, which nobody redelivered: `make chaos` lost 100 orders
this way in a 30 s Redis blackhole. The check and the delete are now one script.
"""

from __future__ import annotations

from engine.keys import GROUP, Keys
from engine.pipeline.janitor import Janitor
from engine.pipeline.reader import ensure_group
from engine.testing.waits import wait_for

IDLE_MS = 50


async def idle_past(redis, stream: bytes, consumer: bytes, ms: int) -> None:
    """Until Redis counts the consumer idle over `ms` (XINFO CONSUMERS, as the janitor
    reads it), by Redis's own clock."""
    async def idle() -> bool:
        return any(c["name"] in (consumer, consumer.decode()) and int(c["idle"]) > ms
                   for c in await redis.xinfo_consumers(stream, GROUP))

    await wait_for(idle, 5, f"{consumer!r} idle over {ms} ms", interval=ms / 1000 / 5)


async def test_a_consumer_that_read_since_it_was_found_idle_keeps_its_entries(
        redis, settings, product_id):
    stream = Keys(settings.key_prefix).stream(product_id).encode()
    await ensure_group(redis, stream)
    await redis.xgroup_createconsumer(stream, GROUP, "other")  # holds nothing
    janitor = Janitor(redis, Keys(settings.key_prefix), "me", idle_ms=IDLE_MS, count=100,
                      max_deliveries=5)
    await idle_past(redis, stream, b"other", IDLE_MS)
    candidates = await janitor.idle_consumers([stream])
    assert [(s, bytes(n) if isinstance(n, bytes) else n.encode()) for s, n in candidates] == [
        (stream, b"other")]

    for user in (1, 2, 3):  # the consumer reads a batch between the XINFO and the delete
        await redis.xadd(stream, {"uid": str(user), "ts": "1"})
    await redis.xreadgroup(GROUP, "other", {stream: ">"}, count=10)
    assert await janitor.delete_if_idle(candidates) == []
    assert (await redis.xpending(stream, GROUP))["pending"] == 3

    read = [entry_id for entry_id, _ in await redis.xrange(stream)]
    await redis.xack(stream, GROUP, *read)  # done with them, and idle again: it goes
    await idle_past(redis, stream, b"other", IDLE_MS)
    assert await janitor.delete_if_idle(candidates) == candidates
    assert await redis.xinfo_consumers(stream, GROUP) == []
