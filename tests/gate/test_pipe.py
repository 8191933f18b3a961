"""The coalesced purchases' own connection (engine/gate/pipe.py) when Redis misbehaves:
its connection killed, Redis silent, Redis down and back, replies of mixed kinds in
one batch. On the session's private Redis where a test stops or freezes it."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from engine.errors import SaleStateCorrupt, ServiceUnavailable, WaitTimedOut
from engine.gate.pipe import ScriptPipe
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 0.5  # the client's socket timeout: how long a silent Redis is waited for


async def _gate(url: str, prefix: str, name: str) -> Gate:
    redis = Redis.from_url(url, socket_timeout=TIMEOUT, client_name=name)
    gate = Gate(redis, Keys(prefix), coalesce=True)
    assert isinstance(gate._routed, ScriptPipe)  # a single Redis, no WAIT: the pipe
    return gate


@pytest.fixture
async def pipe_gate(settings, private_redis) -> AsyncIterator[Gate]:
    """A coalescing gate on the session's private Redis (which a test may stop or freeze),
    named so a test finds its connections in CLIENT LIST."""
    gate = await _gate(private_redis.url, settings.key_prefix, f"pipe-{uuid.uuid4().hex[:8]}")
    yield gate
    await gate.close()
    await gate.redis.aclose()


async def _until_accepted(gate: Gate, pid: int, first_uid: int, seconds: float) -> list[str]:
    """Buy as new users until one is accepted; the outcomes and errors on the way."""
    seen: list[str] = []
    uids = itertools.count(first_uid)

    async def accepted() -> bool:
        try:
            outcome = (await asyncio.wait_for(gate.buy(pid, next(uids)), 5)).outcome
        except ServiceUnavailable as exc:
            outcome = f"unavailable: {exc}"
        seen.append(outcome)
        return outcome == "accepted"

    try:
        await wait_for(accepted, seconds, "a purchase accepted again", interval=0.1)
    except WaitTimedOut as exc:
        raise AssertionError(f"never accepted again: {seen[-3:]}") from exc
    return seen


async def test_a_killed_connection_is_replaced(pipe_gate, private_redis, product_id):
    await pipe_gate.open_sale(product_id, 100)
    assert (await pipe_gate.buy(product_id, 1)).outcome == "accepted"
    name = pipe_gate.redis.connection_pool.connection_kwargs["client_name"]
    admin = Redis.from_url(private_redis.url)
    try:
        before = [c for c in await admin.client_list() if c.get("name") == name]
        for client in before:
            await admin.client_kill_filter(_id=client["id"])
        seen = await _until_accepted(pipe_gate, product_id, 2, 10)
        after = [c for c in await admin.client_list() if c.get("name") == name]
    finally:
        await admin.aclose()
    assert before and len(seen) <= 2, seen  # at most the one call that met the kill
    assert {c["id"] for c in after}.isdisjoint({c["id"] for c in before})


async def test_a_silent_redis_fails_the_calls_in_flight_then_recovers(
        pipe_gate, private_redis, product_id):
    await pipe_gate.open_sale(product_id, 100)
    assert (await pipe_gate.buy(product_id, 1)).outcome == "accepted"
    private_redis.freeze()
    try:
        calls = [pipe_gate.buy(product_id, uid) for uid in range(2, 12)]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    finally:
        private_redis.thaw()
    assert all(isinstance(r, ServiceUnavailable) for r in results), results
    assert "no reply within 0.5s" in str(results[0])
    # the calls may have run once Redis woke: a new buyer is accepted on a new connection
    await _until_accepted(pipe_gate, product_id, 100, 10)


async def test_redis_down_answers_at_once_and_reconnects_with_backoff(
        pipe_gate, private_redis, product_id):
    await pipe_gate.open_sale(product_id, 100)
    assert (await pipe_gate.buy(product_id, 1)).outcome == "accepted"
    private_redis.stop()
    try:
        with pytest.raises(ServiceUnavailable):  # the lost connection, or a refused one
            await asyncio.wait_for(pipe_gate.buy(product_id, 2), 5)
        with pytest.raises(ServiceUnavailable):
            await asyncio.wait_for(pipe_gate.buy(product_id, 3), 5)
        # within the backoff after a refused connection, no new attempt is made
        with pytest.raises(ServiceUnavailable, match="next attempt in"):
            await asyncio.wait_for(pipe_gate.buy(product_id, 4), 5)
    finally:
        private_redis.start()
    # a Redis without persistence came back empty (the pool's old connection fails once)
    async def opened() -> bool:
        try:
            await pipe_gate.open_sale(product_id, 100)
        except ServiceUnavailable:
            return False
        return True

    await wait_for(opened, 10, "the sale opened again on the restarted Redis", interval=0.1)
    seen = await _until_accepted(pipe_gate, product_id, 5, 15)
    assert seen[-1] == "accepted"


async def test_each_caller_gets_its_own_reply_in_a_mixed_batch(pipe_gate, product_id):
    """One loop turn: purchases, a duplicate, a sale in a bad state and no sale at all,
    interleaved; replies are handed out in order, each to its caller."""
    good, bad, none = product_id, product_id + 1, product_id + 2
    await pipe_gate.open_sale(good, 3)
    await pipe_gate.open_sale(bad, 3)
    await pipe_gate.redis.delete(pipe_gate.keys.stream(bad))
    await pipe_gate.redis.set(pipe_gate.keys.stream(bad), "not a stream")
    calls = []
    for uid in range(1, 6):
        calls += [pipe_gate.buy(good, uid), pipe_gate.buy(bad, uid), pipe_gate.buy(none, uid)]
    calls.append(pipe_gate.buy(good, 1))
    results = await asyncio.gather(*calls, return_exceptions=True)
    outcomes = [r if isinstance(r, Exception) else r.outcome for r in results]
    assert outcomes[0:15:3] == ["accepted"] * 3 + ["sold_out"] * 2
    assert all(isinstance(o, SaleStateCorrupt) for o in outcomes[1:15:3])
    assert outcomes[2:15:3] == ["no_sale"] * 5
    assert outcomes[15] == "duplicate"
    assert sorted(r.slot for r in results[0:9:3]) == [1, 2, 3]


async def test_calls_arriving_while_a_batch_is_in_flight_go_out_together(pipe_gate, product_id):
    """Redis paused: the first call's batch is in flight, the next 50 calls (one per
    loop turn) wait for its reply and are then written as one batch."""
    await pipe_gate.open_sale(product_id, 1000)
    pipe = pipe_gate._routed
    assert isinstance(pipe, ScriptPipe)
    await pipe_gate.buy(product_id, 1)  # connected
    await pipe_gate.redis.execute_command("CLIENT", "PAUSE", "300", "ALL")
    first = asyncio.ensure_future(pipe_gate.buy(product_id, 2))

    async def first_in_flight() -> bool:
        return len(pipe._inflight) == 1

    await wait_for(first_in_flight, 5, "the first call written", interval=0)
    later = []
    for uid in range(3, 53):
        later.append(asyncio.ensure_future(pipe_gate.buy(product_id, uid)))
        await asyncio.sleep(0)  # the scenario: one call per loop turn, not one burst
    held = len(pipe._queue)
    results = await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert held == 50  # none sent while the first was in flight
    assert [r.outcome for r in results] == ["accepted"] * 51
    assert len({r.slot for r in results}) == 51
