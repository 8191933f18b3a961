"""The state watch on the real Redis: a vanished marker is noticed once, by one worker.

Deleting the marker is what a Redis restarted without persistence (or flushed) looks
like to the watch; the shared Redis is not flushed here. The whole fault, a private
Redis SIGKILLed and restarted empty under a running engine, is a row of `make chaos`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

from engine.keys import Keys
from engine.pipeline.statewatch import StateWatch


def lost_count() -> float:
    return REGISTRY.get_sample_value("seckill_redis_state_lost_total") or 0.0


async def test_a_vanished_marker_is_noticed_once_across_workers(redis, settings, caplog):
    keys = Keys(settings.key_prefix)
    first, second = StateWatch(redis, keys, "w1"), StateWatch(redis, keys, "w2")
    await first.arm()
    await second.arm()
    assert await redis.get(keys.state_marker) == b"w1"  # the first marker is kept
    before = lost_count()
    assert (await first.check(), await second.check()) == (False, False)

    await redis.delete(keys.state_marker)  # every key gone, as far as the watch can tell
    assert (await second.check(), await first.check()) == (True, False)
    assert (await second.check(), await first.check()) == (False, False)
    assert lost_count() == before + 1
    lines = [r for r in caplog.records if getattr(r, "event", None) == "redis_state_lost"]
    assert len(lines) == 1 and "appendonly yes" in lines[0].getMessage()
