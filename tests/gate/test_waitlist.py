"""The waitlist's scripts against the real Redis: joining (lua/waitlist.lua), the
position (lua/position.lua), and a returned unit handed to the head of the line in the
same call that returns it (lua/refund.lua), exactly once and in join order."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import SaleStateCorrupt
from engine.gate.redis_gate import Gate, Limits, Position, Returned, WaitlistFigures, Window


async def sold_out(gate: Gate, pid: int, stock: int = 2, **kw) -> tuple[str, list]:
    """A sale of `stock` units bought by users 1..stock; (sale ID, their results)."""
    sale = await gate.open_sale(pid, stock, **kw)
    bought = [await gate.buy(pid, uid) for uid in range(1, stock + 1)]
    assert all(r.outcome == "accepted" for r in bought)
    return sale, bought


async def test_join_answers(gate, product_id):
    pid = product_id
    assert (await gate.join_waitlist(pid, 100)).outcome == "no_sale"
    await gate.open_sale(pid, 1)
    assert (await gate.join_waitlist(pid, 100)).outcome == "stock_left"  # buy instead
    assert (await gate.buy(pid, 1)).outcome == "accepted"
    assert (await gate.join_waitlist(pid, 1)).outcome == "buyer"  # holds a live order
    assert (await gate.join_waitlist(pid, 100))[:2] == ("joined", 1)
    assert (await gate.join_waitlist(pid, 101))[:2] == ("joined", 2)
    assert (await gate.join_waitlist(pid, 100))[:2] == ("waiting", 1)
    assert await gate.position(pid, 101) == Position("waiting", 2, 0)
    assert await gate.position(pid, 102) == Position("none")
    assert await gate.leave_waitlist(pid, 100) is True
    assert await gate.leave_waitlist(pid, 100) is False
    assert await gate.position(pid, 101) == Position("waiting", 1, 0)


async def test_join_outside_the_window_and_when_full(gate, product_id, redis, keys):
    pid = product_id
    now = int((await redis.time())[0]) * 1000
    await gate.open_sale(pid, 1, window=Window(start_ms=now + 60_000))
    early = await gate.join_waitlist(pid, 100)
    assert (early.outcome, early.at_ms) == ("not_started", now + 60_000)
    await gate.open_sale(pid, 1, waitlist_max=2)
    await gate.buy(pid, 1)
    assert [(await gate.join_waitlist(pid, u)).outcome for u in (100, 101, 102)] == \
        ["joined", "joined", "full"]
    assert (await gate.join_waitlist(pid, 102)).most == 2
    small = Gate(gate.redis, gate.keys, waitlist_max=0)  # the setting, no sale override
    await small.open_sale(pid, 1)
    await small.buy(pid, 9)  # (user 1 bought in the earlier sale)
    assert (await small.join_waitlist(pid, 100)).outcome == "full"
    await redis.hset(keys.window(pid), "end", now - 1)
    ended = await gate.join_waitlist(pid, 100)
    assert (ended.outcome, ended.at_ms) == ("ended", now - 1)
    assert await redis.zcard(keys.waitlist(pid)) == 0


async def test_join_spends_the_purchase_rate_limit(gate, product_id, redis, keys):
    pid = product_id
    limited = Gate(gate.redis, gate.keys, limits=Limits(user_rate=1.0, user_burst=2))
    await limited.open_sale(pid, 1)
    assert (await limited.buy(pid, 1)).outcome == "accepted"
    assert (await limited.buy(pid, 2)).outcome == "sold_out"  # user 2 spent 1 of 2
    assert (await limited.join_waitlist(pid, 2)).outcome == "joined"
    third = await limited.join_waitlist(pid, 2)
    assert (third.outcome, third.limited_by) == ("rate_limited", "user")
    assert third.retry_after_ms > 0
    by_ip = Gate(gate.redis, gate.keys, limits=Limits(ip_rate=1.0, ip_burst=1))
    assert (await by_ip.join_waitlist(pid, 3, ip="10.0.0.1")).outcome == "joined"
    assert (await by_ip.join_waitlist(pid, 4, ip="10.0.0.1")).limited_by == "ip"


async def test_positions_are_first_come_first_served(gate, product_id):
    pid = product_id
    await sold_out(gate, pid, clear_buyers=True)
    users = list(range(100, 160))
    for uid in users:  # one at a time: the arrival order is known
        await gate.join_waitlist(pid, uid)
    positions = await asyncio.gather(*(gate.position(pid, uid) for uid in users))
    assert [p.position for p in positions] == list(range(1, 61))


async def test_a_returned_unit_goes_to_the_head_exactly_once(gate, product_id, redis, keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid)
    for uid in (100, 101, 102):
        await gate.join_waitlist(pid, uid)
    first = bought[0]
    handed = await gate.return_unit(pid, 1, sale, first.slot, first.stream_id)
    assert handed.outcome == "handed" and handed.user_id == 100
    # the same returned unit again (a redelivered report, a crash before the mark)
    assert await gate.return_unit(pid, 1, sale, first.slot, first.stream_id) == \
        Returned("already_refunded")
    assert await gate.refund(pid, 1, sale, first.slot, first.stream_id) == "already_refunded"
    entries = await redis.xrange(keys.stream(pid))
    made = {eid.decode(): f for eid, f in entries}[handed.stream_id]
    assert made[b"uid"] == b"100" and made[b"from"] == b"waitlist" and made[b"turn"] == b"1"
    assert (made[b"sale"].decode(), int(made[b"slot"])) == (sale, first.slot)
    assert int(made[b"ts"]) > 1_700_000_000
    assert len(entries) == 3
    buyers = {int(u) for u in await redis.smembers(keys.buyers(pid))}
    assert buyers == {2, 100}  # the returning user is no buyer, the head is
    assert await gate.position(pid, 101) == Position("waiting", 1, 1)
    assert await gate.position(pid, 100) == Position("none")
    assert int(await redis.get(keys.stock(pid))) == 0
    # the next one goes to the next in line; with nobody left, to stock
    second = bought[1]
    assert (await gate.return_unit(pid, 2, sale, second.slot, second.stream_id)).user_id == 101
    made_entry = (await redis.xrange(keys.stream(pid)))[-1][1]
    assert made_entry[b"uid"] == b"101"
    await gate.leave_waitlist(pid, 102)
    again = await gate.return_unit(pid, 100, sale, first.slot, handed.stream_id)
    assert again == Returned("refunded")
    assert int(await redis.get(keys.stock(pid))) == 1
    assert await redis.lrange(keys.free_slots(pid), 0, -1) == [str(first.slot).encode()]
    assert await gate.waitlist_figures(pid) == WaitlistFigures(0, 2, 0)


async def test_returns_racing_each_other_hand_each_unit_once(gate, product_id, redis, keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid, stock=20)
    for uid in range(100, 130):
        await gate.join_waitlist(pid, uid)
    calls = [gate.return_unit(pid, r_uid, sale, r.slot, r.stream_id)
             for r_uid, r in enumerate(bought, start=1) for _ in range(3)]
    results = await asyncio.gather(*calls)
    handed = sorted(r.user_id for r in results if r.outcome == "handed")
    assert handed == list(range(100, 120))  # each unit once, in join order
    assert sum(r.outcome == "already_refunded" for r in results) == 40
    assert await redis.zcard(keys.waitlist(pid)) == 10


async def test_a_waiting_user_who_holds_an_order_is_skipped(gate, product_id, redis, keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid)
    await gate.join_waitlist(pid, 100)
    await gate.join_waitlist(pid, 101)
    await redis.sadd(keys.buyers(pid), 100)  # bought meanwhile (say a reopened sale)
    handed = await gate.return_unit(pid, 1, sale, bought[0].slot, bought[0].stream_id)
    assert handed.user_id == 101
    assert await redis.zcard(keys.waitlist(pid)) == 0


async def test_after_the_window_end_a_returned_unit_goes_to_stock(gate, product_id, redis,
                                                                  keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid)
    await gate.join_waitlist(pid, 100)
    now = int((await redis.time())[0]) * 1000
    await redis.hset(keys.window(pid), "end", now - 1)
    assert await gate.position(pid, 100) == Position("ended")
    assert await gate.refund(pid, 1, sale, bought[0].slot, bought[0].stream_id) == "refunded"
    assert await redis.xlen(keys.stream(pid)) == 2
    assert await gate.position(pid, 100) == Position("ended")


async def test_closing_the_sale_ends_the_waitlist(gate, product_id, redis, keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid)
    await gate.join_waitlist(pid, 100)
    await gate.close_sale(pid)
    assert await redis.exists(keys.waitlist(pid), keys.waitlist_seq(pid)) == 0
    assert await gate.position(pid, 100) == Position("ended")
    assert 0 < await redis.ttl(keys.waitlist_ended(pid))
    assert await gate.refund(pid, 1, sale, bought[0].slot, bought[0].stream_id) == \
        "sale_changed"
    assert await redis.xlen(keys.stream(pid)) == 2
    assert (await gate.join_waitlist(pid, 101)).outcome == "no_sale"
    # a new sale: a fresh line, its turns from 1
    await sold_out(gate, pid, clear_buyers=True)
    assert (await gate.join_waitlist(pid, 101))[:2] == ("joined", 1)


async def test_a_release_is_recorded_once(gate, product_id, redis, keys):
    pid = product_id
    assert await gate.record_release(pid, 5, 42, "1-1", "s1") is True
    assert await gate.record_release(pid, 5, 42, "1-1", "s1") is False
    [(_, fields)] = await redis.xrange(keys.releases(pid))
    assert {k.decode(): v.decode() for k, v in fields.items() if k != b"at"} == \
        {"uid": "5", "instance_id": "42", "stream_id": "1-1", "sale": "s1"}
    assert int(fields[b"at"]) > 1_700_000_000_000
    assert (await gate.waitlist_figures(pid)).released == 1


async def test_bad_keys_refuse_before_writing(gate, product_id, redis, keys):
    pid = product_id
    sale, bought = await sold_out(gate, pid)
    await gate.join_waitlist(pid, 100)
    stream = keys.stream(pid)
    entries = await redis.xrange(stream)
    await redis.delete(stream)
    await redis.set(stream, "not a stream")
    with pytest.raises(SaleStateCorrupt):
        await gate.refund(pid, 1, sale, bought[0].slot, bought[0].stream_id)
    assert await redis.zcard(keys.waitlist(pid)) == 1
    assert not await redis.sismember(keys.refunded(pid), bought[0].stream_id)
    assert len(entries) == 2
    await redis.set(keys.stock(pid), "1.5")
    with pytest.raises(SaleStateCorrupt):
        await gate.join_waitlist(pid, 101)
