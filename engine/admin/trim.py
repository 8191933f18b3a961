"""`seckill trim`: remove order-stream entries the consumer group is done with, and no others.

Never `MAXLEN` on an order stream: it drops entries whether or not they were
processed. The safe point of a stream is the oldest entry the group still
needs: its first pending entry, or, if nothing is pending, the first entry
after the group's last-delivered ID. `XTRIM MINID` keeps everything from
that point on. Safe to run from cron while the engine runs: the safe point
only moves forward, and an entry read after we looked is newer than it.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.config import Settings
from engine.connections import connect_redis
from engine.keys import Keys


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def safe_point(redis: Redis, stream: str) -> str | None:
    """The oldest entry ID the group may still need, or None to leave the stream alone."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return None
    if not groups:
        return None  # no consumer group: nobody has processed anything
    points = []
    for g in groups:
        pending = await redis.xpending(stream, g["name"])
        if pending["pending"]:
            lowest = pending["min"]
            points.append(lowest.decode() if isinstance(lowest, bytes) else str(lowest))
        else:
            last = g["last-delivered-id"]
            points.append(_next_id(last.decode() if isinstance(last, bytes) else str(last)))
    return min(points, key=lambda i: tuple(int(x) for x in i.split("-")))


async def trim_stream(redis: Redis, stream: str) -> int:
    point = await safe_point(redis, stream)
    if point is None or point == "0-1":
        return 0
    return int(await redis.xtrim(stream, minid=point, approximate=False))


async def trim_command(settings: Settings, *, product_id: int | None = None) -> int:
    keys = Keys(settings.key_prefix)
    redis = await connect_redis(settings)
    try:
        pids = [product_id] if product_id else sorted(int(p) for p in
                                                      await redis.smembers(keys.streams))
        total = 0
        for pid in pids:
            removed = await trim_stream(redis, keys.stream(pid))
            total += removed
            print(f"product {pid}: removed {removed} acknowledged entries")
        print(f"trimmed {total} entries from {len(pids)} streams")
        return 0
    finally:
        await redis.aclose()

