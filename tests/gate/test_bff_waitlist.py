"""The waitlist and the owner's DELETE over HTTP: a real BFF (Granian), real Redis and
PostgreSQL; orders are logged as the engine logs them (write_batch)."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from engine.gate.redis_gate import Gate, Window
from engine.pipeline.orderrows import prepare_connection, write_batch
from engine.pipeline.orders import Order
from engine.testing.bff import Bff

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bff(settings):
    server = Bff(settings, bff_soldout_recheck=0.3)
    yield server
    server.stop()


async def log_order(settings, gate: Gate, pid: int, uid: int, stream_id: str, slot: int,
                    status: str) -> int:
    """The order's row as the engine writes it, then moved to `status`; its instance ID."""
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1,
                                     init=prepare_connection)
    try:
        sale = (await gate.sale_state(pid)).sale_id
        instance = pid * 1000 + uid
        await write_batch(pool, [Order(pid, uid, stream_id, 1, sale, slot, b"s", instance)], 10)
        await pool.execute("UPDATE seckill_logs SET status = $2 WHERE instance_id = $1",
                           instance, status)
    finally:
        await pool.close()
    return instance


async def test_join_answers_and_position(bff, gate, settings, product_id):
    pid = product_id
    wait = f"/api/v1/seckill/{pid}/waitlist"
    order = f"/api/v1/seckill/{pid}/users/{{}}"
    async with httpx.AsyncClient(base_url=bff.url) as client:
        r = await client.post(wait, json={"user_id": 9})
        assert (r.status_code, r.json()) == (404, {"status": "no_sale"})
        await gate.open_sale(pid, 1)
        r = await client.post(wait, json={"user_id": 9})
        assert r.status_code == 409 and r.json()["status"] == "stock_left"
        assert "buy instead" in r.json()["message"]
        assert (await client.post(f"/api/v1/seckill/{pid}", json={"user_id": 1})).status_code \
            == 202
        r = await client.post(wait, json={"user_id": 1})
        assert r.status_code == 409 and r.json()["status"] == "buyer"
        r = await client.post(wait, json={"user_id": 9})
        assert (r.status_code, r.json()) == (202, {"status": "joined", "state": "WAITLISTED",
                                                   "position": 1})
        assert (await client.post(wait, json={"user_id": 10})).json()["position"] == 2
        r = await client.post(wait, json={"user_id": 9})
        assert (r.status_code, r.json()["position"]) == (200, 1)
        r = await client.get(order.format(10))
        assert r.json() == {"state": "WAITLISTED", "position": 2, "handed_out": 0}
        # leaving: 200 LEFT, then the next user moves up; leaving twice is a 404
        r = await client.delete(order.format(9))
        assert (r.status_code, r.json()) == (200, {"state": "LEFT"})
        assert (await client.delete(order.format(9))).status_code == 404
        assert (await client.get(order.format(10))).json()["position"] == 1
        assert (await client.post(wait, json={})).status_code == 400  # who?
        # the sale closes: a waiting user reads ENDED, a join is 404 no sale
        await gate.close_sale(pid)
        assert (await client.get(order.format(10))).json() == {"state": "ENDED"}
        assert (await client.post(wait, json={"user_id": 11})).status_code == 404


async def test_join_before_start_after_end_and_when_full(bff, gate, redis, keys, product_id):
    pid = product_id
    wait = f"/api/v1/seckill/{pid}/waitlist"
    now = int((await redis.time())[0]) * 1000
    async with httpx.AsyncClient(base_url=bff.url) as client:
        await gate.open_sale(pid, 1, window=Window(start_ms=now + 60_000))
        r = await client.post(wait, json={"user_id": 9})
        assert (r.status_code, r.json()["start_ms"]) == (425, now + 60_000)
        await gate.open_sale(pid, 1, waitlist_max=1)
        await gate.buy(pid, 1)
        assert (await client.post(wait, json={"user_id": 9})).status_code == 202
        r = await client.post(wait, json={"user_id": 10})
        assert (r.status_code, r.json()["status"]) == (410, "full")
        assert "full" in r.json()["message"]
        await redis.hset(keys.window(pid), "end", now - 1)
        r = await client.post(wait, json={"user_id": 10})
        assert (r.status_code, r.json()) == (410, {"status": "ended"})
        r = await client.get(f"/api/v1/seckill/{pid}/users/9")
        assert r.json() == {"state": "ENDED"}


async def test_release_answers(bff, gate, settings, product_id, redis, keys):
    pid = product_id
    order = f"/api/v1/seckill/{pid}/users/{{}}"
    await gate.open_sale(pid, 3)
    async with httpx.AsyncClient(base_url=bff.url) as client:
        bought = {u: (await client.post(f"/api/v1/seckill/{pid}", json={"user_id": u})).json()
                  for u in (1, 2, 3)}
        assert (await client.delete(order.format(7))).status_code == 404  # no order
        r = await client.delete(order.format(1))  # in the stream, not logged yet
        assert r.status_code == 409 and "release it after it runs" in r.json()["error"]
        await log_order(settings, gate, pid, 2, bought[2]["stream_id"], bought[2]["slot"],
                        "PROCESSING")
        r = await client.delete(order.format(2))
        assert r.status_code == 409 and "PROCESSING" in r.json()["error"]
        instance = await log_order(settings, gate, pid, 3, bought[3]["stream_id"],
                                   bought[3]["slot"], "RUNNING")
        r = await client.delete(order.format(3))
        assert (r.status_code, r.json()) == (202, {"state": "RELEASING"})
        r = await client.delete(order.format(3))  # idempotent
        assert (r.status_code, r.json()) == (200, {"state": "RELEASING"})
    [(_, fields)] = await redis.xrange(keys.releases(pid))
    sale = (await gate.sale_state(pid)).sale_id
    assert {k.decode(): v.decode() for k, v in fields.items() if k != b"at"} == {
        "uid": "3", "instance_id": str(instance), "stream_id": bought[3]["stream_id"],
        "sale": sale}


async def test_the_token_user_only(settings, issuer, gate, product_id):
    """With authentication: no token 401, another user's order 403, /order is the caller's."""
    pid = product_id
    server = Bff(settings.replace(bff_auth="jwt", bff_jwks=str(issuer.jwks)))
    token = {"authorization": f"Bearer {issuer.token(9)}"}
    await gate.open_sale(pid, 1)
    await gate.buy(pid, 1)
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            wait = f"/api/v1/seckill/{pid}/waitlist"
            assert (await client.post(wait)).status_code == 401
            r = await client.post(wait, headers=token, json={"user_id": 8})
            assert r.status_code == 403
            assert (await client.post(wait, headers=token)).status_code == 202
            mine = f"/api/v1/seckill/{pid}/order"
            assert (await client.get(mine, headers=token)).json()["state"] == "WAITLISTED"
            assert (await client.delete(f"/api/v1/seckill/{pid}/users/1",
                                        headers=token)).status_code == 403
            assert (await client.delete(mine)).status_code == 401
            assert (await client.delete(mine, headers=token)).json() == {"state": "LEFT"}
    finally:
        server.stop()
