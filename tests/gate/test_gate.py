"""The Lua gate against the real Redis: no oversell, no double buy, nothing half done."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from engine.errors import InvalidInput, SaleStateCorrupt, SeckillError
from engine.gate.redis_gate import Gate, validate_id
from engine.keys import GROUP, Keys


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every gate test runs both ways: one EVALSHA per call, and the calls of a loop turn
    pipelined (what the BFF uses): the `gate` fixture's `coalesce`."""
    if "gate" in metafunc.fixturenames:
        metafunc.parametrize("gate", [False, True], ids=["one-call", "coalesced"],
                             indirect=True)


async def test_coalesced_calls_share_one_connection(settings, product_id):
    """200 concurrent attempts: one pipeline on one connection, not 200 connections."""
    name = f"gate-test-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(settings.redis_url, max_connections=256, client_name=name)
    gate = Gate(redis, Keys(settings.key_prefix), coalesce=True)
    try:
        await gate.open_sale(product_id, 100)
        results = await asyncio.gather(*(gate.buy(product_id, u) for u in range(1, 201)))
        clients = [c for c in await redis.client_list() if c.get("name") == name]
    finally:
        await redis.aclose()
    assert sorted(r.outcome for r in results).count("accepted") == 100
    assert sorted(r.slot for r in results if r.slot) == list(range(1, 101))
    assert len(clients) <= 2  # open_sale's and the pipeline's, at most


async def test_20000_attempts_from_5000_users_sell_exactly_the_stock(gate, product_id):
    await gate.open_sale(product_id, 1000)
    attempts = [random.randint(1, 5000) for _ in range(20_000)]
    results = []
    per_task: list[list[str]] = []

    async def worker(chunk: list[int]) -> None:
        mine: list[str] = []
        per_task.append(mine)
        for uid in chunk:
            result = await gate.buy(product_id, uid)
            results.append((uid, result))
            mine.append(result.outcome)

    await asyncio.gather(*(worker(attempts[i::200]) for i in range(200)))
    accepted = [(uid, r) for uid, r in results if r.outcome == "accepted"]
    assert len(accepted) == 1000
    assert len({uid for uid, _ in accepted}) == 1000
    assert sorted(r.slot for _, r in accepted) == list(range(1, 1001))
    keys, redis = gate.keys, gate.redis
    assert int(await redis.get(keys.stock(product_id))) == 0
    assert await redis.xlen(keys.stream(product_id)) == 1000
    assert {int(u) for u in await redis.smembers(keys.buyers(product_id))} == \
        {uid for uid, _ in accepted}
    entries = {eid.decode(): f for eid, f in await redis.xrange(keys.stream(product_id))}
    sale = (await redis.get(keys.sale(product_id))).decode()
    for uid, r in accepted:
        f = entries[r.stream_id]
        assert (int(f[b"uid"]), f[b"sale"].decode(), int(f[b"slot"])) == (uid, sale, r.slot)
        assert int(f[b"ts"]) > 1_700_000_000
    # every other attempt is a duplicate (a buyer: checked before the stock) or sold out
    # (never a buyer: once stock is 0 nobody becomes one)
    buyers = {uid for uid, _ in accepted}
    for uid, r in results:
        if r.outcome == "duplicate":
            assert uid in buyers
        elif r.outcome == "sold_out":
            assert uid not in buyers, uid
        else:
            assert r.outcome == "accepted", r
    # sold out is final: within one task (its attempts are sequential) no attempt is
    # accepted after a sold-out answer, so none was given while stock was left
    for outcomes in per_task:
        if "sold_out" in outcomes:
            assert "accepted" not in outcomes[outcomes.index("sold_out"):]


async def test_duplicate_sold_out_and_no_sale(gate, product_id):
    assert (await gate.buy(product_id, 1)).outcome == "no_sale"
    await gate.open_sale(product_id, 1)
    assert (await gate.buy(product_id, 1)).outcome == "accepted"
    assert (await gate.buy(product_id, 1)).outcome == "duplicate"
    assert (await gate.buy(product_id, 2)).outcome == "sold_out"
    await gate.close_sale(product_id)
    assert (await gate.buy(product_id, 3)).outcome == "no_sale"
    assert await gate.redis.xlen(gate.keys.stream(product_id)) == 1  # the backlog stays


@pytest.mark.parametrize("bad", [0, -1, 2**63, "abc", True, 1.5, None, "", "１２"])
async def test_invalid_ids_never_reach_redis(settings, bad):
    # a client pointed at a closed port: any call to Redis would raise ServiceUnavailable
    redis = Redis.from_url("redis://127.0.0.1:1/0")
    gate = Gate(redis, Keys(settings.key_prefix))
    with pytest.raises(InvalidInput):
        await gate.buy(1001, bad)
    with pytest.raises(InvalidInput):
        await gate.buy(bad, 1)
    await redis.aclose()


def test_validate_id_accepts_ints_and_digit_strings():
    assert validate_id("x", 5) == 5 and validate_id("x", "42") == 42
    assert validate_id("x", 2**63 - 1) == 2**63 - 1
    with pytest.raises(InvalidInput, match="user_id: expected a positive 64-bit integer"):
        validate_id("user_id", -3)


def test_all_keys_of_a_product_share_one_cluster_slot():
    keys = Keys()
    names = [keys.stock(1001), keys.sale(1001), keys.buyers(1001), keys.free_slots(1001),
             keys.refunded(1001), keys.stream(1001), keys.dlq(1001)]
    assert names[0] == "seckill:{1001}:stock" and names[5] == "stream:seckill:{1001}"
    assert len({key_slot(n.encode()) for n in names}) == 1


async def test_noscript_is_recovered(gate, product_id):
    await gate.open_sale(product_id, 5)
    await gate.buy(product_id, 1)
    await gate.redis.script_flush()
    assert (await gate.buy(product_id, 2)).outcome == "accepted"


async def test_a_lua_error_leaves_no_half_purchase(gate, product_id):
    await gate.open_sale(product_id, 5)
    await gate.redis.set(gate.keys.buyers(product_id), "not a set")
    with pytest.raises(ResponseError):
        await gate.buy(product_id, 7)
    assert int(await gate.redis.get(gate.keys.stock(product_id))) == 5
    assert await gate.redis.xlen(gate.keys.stream(product_id)) == 0


async def _state(gate: Gate, pid: int) -> tuple[bytes | None, set[bytes], list[bytes]]:
    """What a purchase writes: stock, buyers and the free slots it may pop."""
    r, k = gate.redis, gate.keys
    return (await r.get(k.stock(pid)), await r.smembers(k.buyers(pid)),
            await r.lrange(k.free_slots(pid), 0, -1))


async def _with_free_slot(gate: Gate, pid: int) -> None:
    """An open sale with one buyer and a handed-back unit, so every write has something to undo."""
    await gate.open_sale(pid, 5)
    assert (await gate.buy(pid, 1)).outcome == "accepted"
    await gate.redis.rpush(gate.keys.free_slots(pid), "3")


async def test_a_stream_key_of_another_type_is_refused_before_any_write(gate, product_id):
    await _with_free_slot(gate, product_id)
    stream = gate.keys.stream(product_id)
    await gate.redis.delete(stream)
    await gate.redis.set(stream, "not a stream")
    before = await _state(gate, product_id)
    with pytest.raises(SaleStateCorrupt, match="is a string, not a stream") as err:
        await gate.buy(product_id, 7)
    assert isinstance(err.value, SeckillError)
    assert await _state(gate, product_id) == before
    assert await gate.redis.get(stream) == b"not a stream"


@pytest.mark.parametrize("stock", ["1.5", "1e3", " 4", "07", "abc", "99999999999999999999"])
async def test_a_stock_decr_would_refuse_is_refused_before_any_write(gate, product_id, stock):
    await _with_free_slot(gate, product_id)
    await gate.redis.set(gate.keys.stock(product_id), stock)
    before = await _state(gate, product_id)
    with pytest.raises(SaleStateCorrupt, match="not an integer stock"):
        await gate.buy(product_id, 7)
    assert await _state(gate, product_id) == before
    assert await gate.redis.xlen(gate.keys.stream(product_id)) == 1


@pytest.mark.parametrize("stock", ["0", "-2"])
async def test_zero_or_negative_stock_is_sold_out(gate, product_id, stock):
    await gate.open_sale(product_id, 5)
    await gate.redis.set(gate.keys.stock(product_id), stock)
    assert (await gate.buy(product_id, 7)).outcome == "sold_out"


async def test_refund_returns_the_unit_exactly_once(gate, product_id):
    sale = await gate.open_sale(product_id, 2)
    first = await gate.buy(product_id, 10)
    await gate.buy(product_id, 11)
    assert (await gate.buy(product_id, 12)).outcome == "sold_out"
    assert await gate.refund(product_id, 10, sale, first.slot, first.stream_id) == "refunded"
    assert await gate.refund(product_id, 10, sale, first.slot, first.stream_id) == \
        "already_refunded"
    again = await gate.buy(product_id, 12)
    assert again.outcome == "accepted" and again.slot == first.slot
    assert (await gate.buy(product_id, 10)).outcome == "sold_out"  # may try again, none left
    state = await gate.sale_state(product_id)
    assert (state.stock, state.buyers) == (0, 2)


async def test_refund_after_the_sale_changed_returns_nothing(gate, product_id):
    sale = await gate.open_sale(product_id, 1)
    r = await gate.buy(product_id, 10)
    await gate.open_sale(product_id, 1, clear_buyers=True)
    assert await gate.refund(product_id, 10, sale, r.slot, r.stream_id) == "sale_changed"
    assert (await gate.sale_state(product_id)).stock == 1
    assert await gate.refund(product_id, 10, sale, r.slot, r.stream_id) == "already_refunded"


async def test_open_sale_prepares_the_stream_for_the_engine(gate, product_id):
    a = await gate.open_sale(product_id, 3)
    await gate.buy(product_id, 1)
    b = await gate.open_sale(product_id, 3)
    assert a != b
    assert (await gate.buy(product_id, 1)).outcome == "duplicate"  # buyers kept
    await gate.open_sale(product_id, 3, clear_buyers=True)
    assert (await gate.buy(product_id, 1)).outcome == "accepted"
    groups = await gate.redis.xinfo_groups(gate.keys.stream(product_id))
    assert [g["name"] for g in groups] == [GROUP.encode()]
    assert str(product_id).encode() in await gate.redis.smembers(gate.keys.streams)
    with pytest.raises(InvalidInput):
        await gate.open_sale(product_id, 0)
