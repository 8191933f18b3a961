"""Release and claim takeover as processes: gate -> engine -> Resource Domain -> status,
on the real services (issue 23, items 4 and 7). Releases are asked for as the BFF's
`DELETE .../order` asks (engine.gate.releases.request_release)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from support import add_products, pg_fetch
from test_closed_loop import ResourceDomainProcess, buy_all, statuses

from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.gate.releases import LATEST_ORDER, request_release
from engine.keys import Keys
from engine.orderstates import RELEASED, RELEASING, RUNNING
from engine.testing.invariants import ledger_problems, read_ledger
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for

# every test here runs a Resource Domain: it starts from empty queues
pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("fresh_queues")]

RELEASES = 20
WAITING = 12


async def orders(settings: Settings, pid: int) -> list:
    return await pg_fetch(settings.pg_dsn, "SELECT instance_id, user_id, stream_id, sale_id,"
                          " slot, status, compensated_at FROM seckill_logs WHERE product_id"
                          " = $1 ORDER BY id", pid)


async def test_owners_release_and_each_unit_is_handed_on_once(settings, product_id, tmp_path):
    """20 owners release (`DELETE .../order`'s function); 12 users wait: the first 12
    released units go to them in turn, the other 8 back to stock."""
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    sale = await gate.open_sale(product_id, RELEASES, clear_buyers=True)
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=2)

    async def latest_order(pid: int, uid: int):
        return await pool.fetchrow(LATEST_ORDER, pid, uid)
    engine = EngineProcess(settings, workers=2)
    rd = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=5)
    try:
        assert await buy_all(gate, product_id, range(1, RELEASES + 1)) == RELEASES

        async def all_running() -> bool:
            return (await statuses(settings, product_id)).get(RUNNING, 0) == RELEASES
        await wait_for(all_running, 90, "every order RUNNING")
        bought = await orders(settings, product_id)
        waiting = list(range(1001, 1001 + WAITING))
        for uid in waiting:  # sold out: they join the line, one after another
            assert (await gate.join_waitlist(product_id, uid)).outcome == "joined"
        for row in bought:
            asked = await request_release(gate, latest_order, product_id, row["user_id"])
            assert asked == (RELEASING, True)
            again = await request_release(gate, latest_order, product_id, row["user_id"])
            assert again.new is False  # a second DELETE asks nothing more
        ids = {r["instance_id"] for r in bought}

        async def all_released() -> bool:
            rows = [r for r in await orders(settings, product_id) if r["instance_id"] in ids]
            return all(r["status"] == RELEASED and r["compensated_at"] for r in rows)
        await wait_for(all_released, 60, "every released order RELEASED and handed on")
        handed = [f for _, f in await redis.xrange(keys.stream(product_id))
                  if f.get(b"from") == b"waitlist"]
        handed_users = [int(f[b"uid"]) for f in handed]

        async def handed_running() -> bool:
            rows = await orders(settings, product_id)
            return sum(r["status"] == RUNNING for r in rows) == len(handed)
        await wait_for(handed_running, 60, "the handed units' orders RUNNING")
        stock = int(await redis.get(keys.stock(product_id)))
        final = await orders(settings, product_id)
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            ledger = await read_ledger(redis, keys, product_id, sale, RELEASES, conn=conn)
        finally:
            await conn.close()
    finally:
        rd.stop()
        engine.stop()
        await pool.close()
        await redis.aclose()
    # every released unit made exactly one new order or one unit of stock
    assert len(handed) + stock == RELEASES
    assert handed_users == waiting  # the first ones, in the order they joined
    assert stock == RELEASES - WAITING
    assert ledger_problems(ledger) == []
    live = [r for r in final if r["status"] not in ("FAILED", RELEASED)]
    assert len({r["slot"] for r in live}) == len(live) == len(handed)
    assert len({r["user_id"] for r in live}) == len(live)
    assert not [p for p in Path(tmp_path).glob("*.yaml")
                if int(p.stem) in ids]  # every released instance's objects deleted
    rd_rows = await pg_fetch(settings.pg_dsn, "SELECT status, count(*) FROM "
                             "resource_domain.instances WHERE instance_id = ANY($1::bigint[])"
                             " GROUP BY status", list(ids))
    assert {r[0]: r[1] for r in rd_rows} == {RELEASED: RELEASES}


async def test_a_killed_resource_domains_claims_are_taken_over_in_seconds(settings, product_id,
                                                                          tmp_path):
    """Item 7: SIGKILL a Resource Domain holding claims mid-provisioning; the next one
    takes them over at once (their owner's advisory lock went with its session), not
    after a fixed staleness."""
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 30, clear_buyers=True)
    engine = EngineProcess(settings, workers=2)
    slow = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=60_000)
    rd = None
    try:
        assert await buy_all(gate, product_id, range(1, 31)) == 30

        async def claims() -> int:
            try:
                rows = await pg_fetch(
                    settings.pg_dsn, "SELECT count(*) FROM resource_domain.instances i JOIN"
                    " seckill_logs l USING (instance_id) WHERE l.product_id = $1 AND "
                    "i.status = 'PROVISIONING'", product_id)
            except asyncpg.UndefinedTableError:  # a new database: the RD makes it at start
                return 0
            return int(rows[0][0])

        async def claimed() -> bool:  # its first batch, being provisioned for a minute
            return await claims() > 0
        await wait_for(claimed, 60, "instances claimed by the slow Resource Domain")
        await asyncio.sleep(1)  # the rest of the orders logged and published meanwhile
        held = await claims()
        slow.kill()
        killed = time.monotonic()
        rd = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=20)

        async def all_final() -> bool:
            s = await statuses(settings, product_id)
            return s.get(RUNNING, 0) + s.get("FAILED", 0) == 30
        await wait_for(all_final, 30, "every order final after the takeover")
        took = time.monotonic() - killed
    finally:
        if rd is not None:
            rd.stop()
        slow.stop()
        engine.stop()
        await redis.aclose()
    print(f"claims taken over: {held} claimed, all 30 instances final {took:.1f}s after the"
          " SIGKILL")
    assert took < 10, f"took {took:.1f}s"
