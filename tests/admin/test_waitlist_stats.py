"""`seckill stats` shows each sale's waitlist: waiting, handed out from it, released."""

from __future__ import annotations

from redis import Redis as SyncRedis

from engine.admin.stats import collect, table
from engine.gate.redis_gate import Gate
from engine.keys import Keys


async def test_stats_show_the_waitlist(settings, redis, product_id):
    gate = Gate(redis, Keys(settings.key_prefix))
    sale = await gate.open_sale(product_id, 1)
    first = await gate.buy(product_id, 1)
    for uid in (10, 11, 12):
        await gate.join_waitlist(product_id, uid)
    assert await gate.refund(product_id, 1, sale, first.slot, first.stream_id) == "handed"
    await gate.record_release(product_id, 10, 99, "5-5", sale)
    sync = SyncRedis.from_url(settings.redis_url)
    try:
        (mine,) = [s for s in await collect(settings, sync) if s.product == product_id]
    finally:
        sync.close()
    assert (mine.waiting, mine.handed_out, mine.released) == (2, 1, 1)
    head, _, line = table([mine]).splitlines()
    assert head.split()[-4:] == ["waiting", "handed", "out", "released"]
    assert line.split()[-3:] == ["2", "1", "1"]
