"""Noticing that Redis lost the gate's state (restarted without persistence, flushed).

Without `appendonly yes` a Redis restart comes back empty: the sales, their stock and
buyers, the order streams with the accepted orders not yet logged, the consumer group.
Nothing in a read says so: a stream that is gone reads as an idle one, and the reader
recreates a missing group empty. So a worker writes a marker key at boot (SET NX) and
checks it on every discovery pass (SET NX: it writes only when the marker is gone).
Gone means every key went with it: the first worker to notice writes the marker again
(so one loss is noticed once across the workers, not once per read or per worker),
logs one ERROR line saying what was lost and what prevents it, and counts it in
seckill_redis_state_lost_total, which the SeckillRedisStateLost alert watches. The
engine itself carries on: it reads the sales opened from then on.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from engine.keys import Keys
from engine.metrics import daemon as metrics

log = logging.getLogger("seckill.statewatch")

LOST = ("Redis lost the gate's state (restarted without persistence, or flushed): the"
        " sales, their stock and buyers, and the order streams are gone; accepted orders"
        " not yet logged in seckill_logs are lost, and the sales must be opened again."
        " appendonly yes + appendfsync always prevents it (docs/operations.md, Fault scoreboard)")


class StateWatch:
    """The marker key of one worker's Redis; `check()` says whether it vanished."""

    def __init__(self, redis: Redis, keys: Keys, owner: str) -> None:
        self.redis = redis
        self.key = keys.state_marker
        self.owner = owner

    async def arm(self) -> None:
        """At boot: the marker exists from now on (an existing one is kept)."""
        await self.redis.set(self.key, self.owner, nx=True)

    async def check(self) -> bool:
        """True when the marker was gone and this worker is the first to notice: the
        loss is logged and counted here, once."""
        if not await self.redis.set(self.key, self.owner, nx=True):
            return False  # still there (or another worker noticed first and said so)
        log.error(LOST, extra={"event": "redis_state_lost"})
        metrics.REDIS_STATE_LOST.inc()
        return True
