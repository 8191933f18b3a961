"""The purchase script's own branches: a handed-back unit sold once, and every refusal of a
key it cannot use coming before its first write, the limiter's included."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.errors import SaleStateCorrupt
from engine.gate.redis_gate import Gate, Limits, Window
from engine.keys import Keys

# the last ID a stream can hold: XADD * after it is refused ("exhausted the last ID")
LAST_ID = "18446744073709551615-18446744073709551615"


@pytest.fixture
async def limited_gate(settings):
    """A gate with the per-user limiter on, as the BFF calls it."""
    redis = Redis.from_url(settings.redis_url)
    yield Gate(redis, Keys(settings.key_prefix), limits=Limits(user_rate=2.0, user_burst=5))
    await redis.aclose()


async def _written(limited_gate: Gate, pid: int, uid: int) -> tuple[object, ...]:
    """Everything an attempt by `uid` may write (DUMP: keys of any type compare)."""
    r, k = limited_gate.redis, limited_gate.keys
    return (await r.get(k.stock(pid)), await r.smembers(k.buyers(pid)),
            await r.dump(k.free_slots(pid)), await r.dump(k.stream(pid)),
            await r.get(k.user_limiter(pid, uid)))


async def test_a_handed_back_unit_is_sold_once_then_new_units_again(limited_gate, product_id):
    sale = await limited_gate.open_sale(product_id, 3)
    first = await limited_gate.buy(product_id, 1)
    second = await limited_gate.buy(product_id, 2)
    assert (first.slot, second.slot) == (3, 2)
    assert await limited_gate.refund(product_id, 1, sale, first.slot, first.stream_id) == "refunded"
    again = await limited_gate.buy(product_id, 3)
    assert again.outcome == "accepted" and again.slot == first.slot
    assert await limited_gate.redis.llen(limited_gate.keys.free_slots(product_id)) == 0
    last = await limited_gate.buy(product_id, 4)  # the free slot was taken: a new unit
    assert last.outcome == "accepted" and last.slot == 1
    assert (await limited_gate.buy(product_id, 5)).outcome == "sold_out"
    entries = await limited_gate.redis.xrange(limited_gate.keys.stream(product_id))
    assert [int(fields[b"slot"]) for _, fields in entries] == [3, 2, 3, 1]


async def test_a_free_slots_key_of_another_type_is_refused_before_any_write(limited_gate,
                                                                           product_id):
    await limited_gate.open_sale(product_id, 5, window=Window(start_ms=1))
    await limited_gate.redis.set(limited_gate.keys.free_slots(product_id), "not a list")
    before = await _written(limited_gate, product_id, 7)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await limited_gate.buy(product_id, 7)
    assert await _written(limited_gate, product_id, 7) == before
    assert before[-1] is None  # the limiter was not charged either


async def test_a_stream_key_of_another_type_leaves_the_limiter_alone(limited_gate, product_id):
    await limited_gate.open_sale(product_id, 5)
    stream = limited_gate.keys.stream(product_id)
    await limited_gate.redis.delete(stream)
    await limited_gate.redis.set(stream, "not a stream")
    before = await _written(limited_gate, product_id, 7)
    with pytest.raises(SaleStateCorrupt, match="is a string, not a stream"):
        await limited_gate.buy(product_id, 7)
    assert await _written(limited_gate, product_id, 7) == before
    assert before[-1] is None


async def test_a_stream_that_refuses_the_entry_leaves_no_half_purchase(limited_gate, product_id):
    """XADD is the purchase's first write: when Redis refuses it for a reason of its own,
    no stock, buyer, free slot or limiter was written before it."""
    sale = await limited_gate.open_sale(product_id, 5)
    first = await limited_gate.buy(product_id, 1)
    assert await limited_gate.refund(product_id, 1, sale, first.slot, first.stream_id) == "refunded"
    stream = limited_gate.keys.stream(product_id)
    await limited_gate.redis.delete(stream)
    await limited_gate.redis.xadd(stream, {"uid": "0"}, id=LAST_ID)
    before = await _written(limited_gate, product_id, 7)
    with pytest.raises(ResponseError, match="last possible ID"):
        await limited_gate.buy(product_id, 7)
    assert await _written(limited_gate, product_id, 7) == before
    # the handed-back slot is still there to sell
    free = limited_gate.keys.free_slots(product_id)
    assert await limited_gate.redis.lrange(free, 0, -1) == [b"5"]


async def test_without_window_or_limits_the_attempt_still_sells(settings, product_id):
    """No window and no limit: the script reads no clock and writes no limiter."""
    redis = Redis.from_url(settings.redis_url)
    limited_gate = Gate(redis, Keys(settings.key_prefix))
    try:
        await limited_gate.open_sale(product_id, 1)
        assert (await limited_gate.buy(product_id, 1)).outcome == "accepted"
        assert (await limited_gate.buy(product_id, 1)).outcome == "duplicate"
        assert (await limited_gate.buy(product_id, 2)).outcome == "sold_out"
        assert not await redis.exists(limited_gate.keys.user_limiter(product_id, 1))
    finally:
        await redis.aclose()


async def test_a_limited_attempt_is_charged_on_every_answer(limited_gate, product_id):
    """An accepted attempt, a duplicate and a sold-out one each spend the user's limit."""
    await limited_gate.open_sale(product_id, 1, limits=Limits(user_rate=0.5, user_burst=2))
    assert (await limited_gate.buy(product_id, 1)).outcome == "accepted"
    assert (await limited_gate.buy(product_id, 1)).outcome == "duplicate"
    assert (await limited_gate.buy(product_id, 1)).outcome == "rate_limited"
    assert (await limited_gate.buy(product_id, 2)).outcome == "sold_out"
    assert (await limited_gate.buy(product_id, 2)).outcome == "sold_out"
    limited = await limited_gate.buy(product_id, 2)
    assert limited.outcome == "rate_limited" and limited.limited_by == "user"


async def test_the_gate_state_names_the_open_sale_and_a_stale_one_is_ignored(limited_gate,
                                                                            product_id):
    """The script reads the window from the gate state while it names the open sale:
    written by open_sale when the sale has no start, expiring at the end, written by the
    script once a scheduled sale has started, and ignored when it names another sale."""
    r, k = limited_gate.redis, limited_gate.keys
    state = k.gate_state(product_id)
    sale = await limited_gate.open_sale(product_id, 5)
    assert (await r.get(state), await r.pttl(state)) == (sale.encode(), -1)
    now_ms = int(time.time() * 1000)
    sale = await limited_gate.open_sale(product_id, 5, window=Window(end_ms=now_ms + 60_000))
    assert 0 < await r.pttl(state) <= 60_000
    sale = await limited_gate.open_sale(product_id, 5, window=Window(start_ms=now_ms - 1000),
                                        limits=Limits(user_rate=0.5, user_burst=2))
    assert not await r.exists(state)  # a start: judged by Redis's clock, in the script
    assert (await limited_gate.buy(product_id, 1)).outcome == "accepted"
    assert await r.get(state) == f"{sale}\t0.5\t2\t0.0\t1".encode()
    await r.set(state, "another-sale")  # e.g. left by a sale opened without it
    assert (await limited_gate.buy(product_id, 2)).outcome == "accepted"
    entries = await r.xrange(k.stream(product_id))
    assert {fields[b"sale"] for _, fields in entries} == {sale.encode()}
    assert await r.get(state) == f"{sale}\t0.5\t2\t0.0\t1".encode()


async def test_an_accepted_purchase_writes_no_limiter_but_counts(limited_gate, product_id):
    """A new buyer's accepted attempt reads no clock and writes no limiter: the buyers set
    records it, and the buyer's next attempt counts it as spent just now."""
    await limited_gate.open_sale(product_id, 5, limits=Limits(user_rate=0.5, user_burst=2))
    limiter = limited_gate.keys.user_limiter(product_id, 1)
    assert (await limited_gate.buy(product_id, 1)).outcome == "accepted"
    assert not await limited_gate.redis.exists(limiter)
    assert (await limited_gate.buy(product_id, 1)).outcome == "duplicate"
    assert 2000 < await limited_gate.redis.pttl(limiter) <= 4000  # two shares spent
    assert (await limited_gate.buy(product_id, 1)).outcome == "rate_limited"
