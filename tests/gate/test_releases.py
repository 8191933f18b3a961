"""`request_release` (engine/gate/releases.py), the one function behind DELETE .../order
and `seckill order release`, for the row states the engine moves an order through.

The rows here are as the engine's release path leaves them (RELEASING, RELEASED, a
FAILED one given back): given to the function as its order lookup, on the real Redis."""

from __future__ import annotations

import pytest

from engine.gate.releases import NoOrder, NotReleasable, Release, request_release


def row(status: str, *, compensated: bool = False) -> dict[str, object]:
    return {"status": status, "instance_id": 42, "stream_id": "1-1", "sale_id": "s",
            "compensated_at": "yesterday" if compensated else None}


def lookup(found: dict[str, object] | None):
    async def fetch(pid: int, uid: int) -> dict[str, object] | None:
        return found
    return fetch


@pytest.mark.parametrize("status", ["RELEASING", "RELEASED"])
async def test_a_release_under_way_or_done_answers_its_state(gate, product_id, status, redis,
                                                             keys):
    assert await request_release(gate, lookup(row(status)), product_id, 5) == Release(status)
    assert await redis.xlen(keys.releases(product_id)) == 0


async def test_running_asks_once(gate, product_id, redis, keys):
    running = lookup(row("RUNNING"))
    assert await request_release(gate, running, product_id, 5) == Release("RELEASING", True)
    assert await request_release(gate, running, product_id, 5) == Release("RELEASING", False)
    assert await redis.xlen(keys.releases(product_id)) == 1


async def test_nothing_to_give_back(gate, product_id, redis, keys):
    with pytest.raises(NotReleasable, match="FAILED: nothing to release"):
        await request_release(gate, lookup(row("FAILED")), product_id, 5)
    with pytest.raises(NoOrder):
        await request_release(gate, lookup(None), product_id, 5)
    # given back (released, its unit handed on) and bought again: the new one is pending
    await redis.sadd(keys.buyers(product_id), 5)
    with pytest.raises(NotReleasable, match="PENDING"):
        await request_release(gate, lookup(row("RELEASED", compensated=True)), product_id, 5)
