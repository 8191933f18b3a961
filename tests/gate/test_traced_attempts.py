"""A sampled attempt's trace context goes into its stream entry as one field; an
unsampled attempt's entry is what it always was."""

from __future__ import annotations

import pytest

from engine.gate.redis_gate import Gate, Limits
from engine.keys import Keys
from engine.tracing import STREAM_FIELD

CONTEXT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("gate", [False, True], indirect=True, ids=["evalsha", "coalesced"])
async def test_only_a_sampled_attempt_writes_the_field(gate, redis, keys, product_id):
    await gate.open_sale(product_id, 5)
    plain = await gate.attempt(product_id, 1)
    traced = await gate.attempt(product_id, 2, trace=CONTEXT)
    assert (plain.outcome, traced.outcome) == ("accepted", "accepted")
    entries = dict(await redis.xrange(keys.stream(product_id)))
    assert set(entries[plain.stream_id.encode()]) == {b"uid", b"ts", b"sale", b"slot"}
    assert entries[traced.stream_id.encode()][STREAM_FIELD] == CONTEXT.encode()
    assert entries[traced.stream_id.encode()][b"uid"] == b"2"


async def test_the_context_follows_every_limit_argument(settings, redis, keys, product_id):
    """With limits set the context is still the seventh argument, and the limits apply."""
    gate = Gate(redis, Keys(settings.key_prefix), limits=Limits(user_rate=1, user_burst=1))
    await gate.open_sale(product_id, 5)
    first = await gate.attempt(product_id, 3, trace=CONTEXT)
    again = await gate.attempt(product_id, 3, trace=CONTEXT)
    assert (first.outcome, again.outcome) == ("accepted", "rate_limited")
    [(_, fields)] = await redis.xrange(keys.stream(product_id))
    assert fields[STREAM_FIELD] == CONTEXT.encode()
