"""After sold out, end to end: gate -> engine -> Resource Domain -> status -> handoff.

Stock 100, 300 buyers, 150 of the others join the waitlist; one provisioning in ten
fails, and each failed order's unit goes to the head of the line in the refund script,
as an order the engine logs and the Resource Domain provisions like any other (a
handed order may fail too: its unit goes on to the next in line). So exactly the
first N waiting users get orders, N the failures, each provisioned once. Then 20
owners release their RUNNING instances: the next 20 in line get orders.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from redis.asyncio import Redis
from support import add_products, pg_fetch

from engine.gate.redis_gate import Gate
from engine.gate.releases import LATEST_ORDER, request_release
from engine.keys import Keys
from engine.testing.invariants import ledger_problems, read_ledger
from engine.testing.ports import free_port
from engine.testing.processes import EngineProcess, SeckillProcess, engine_env
from engine.testing.waits import wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("fresh_queues")]

STOCK, BUYERS, WAITING, RELEASES = 100, 300, 150, 20

SETTLED = """
SELECT count(*) FILTER (WHERE status = 'RUNNING') AS running,
       count(*) FILTER (WHERE status = 'FAILED') AS failed,
       count(*) FILTER (WHERE status = 'RELEASED') AS released,
       count(*) FILTER (WHERE status IN ('FAILED', 'RELEASED') AND compensated_at IS NULL)
           AS unreturned,
       count(*) AS rows
FROM seckill_logs WHERE product_id = $1 AND sale_id = $2
"""


async def test_failed_units_go_to_the_first_waiting_users(settings, product_id, tmp_path):
    pid = product_id
    await add_products(settings, [pid])
    redis = Redis.from_url(settings.redis_url, max_connections=128)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys, coalesce=True)  # the BFF's way: one connection
    sale = await gate.open_sale(pid, STOCK, clear_buyers=True)
    results = await asyncio.gather(*(gate.buy(pid, u) for u in range(1, BUYERS + 1)))
    buyers = {u for u, r in zip(range(1, BUYERS + 1), results, strict=True)
              if r.outcome == "accepted"}
    assert len(buyers) == STOCK
    line = [u for u in range(1, BUYERS + 1) if u not in buyers][:WAITING]
    for uid in line:  # one at a time: the join order is the list's
        assert (await gate.join_waitlist(pid, uid)).outcome == "joined"
    engine = EngineProcess(settings, workers=2)
    rd = SeckillProcess(["resource-domain"], engine_env(
        settings, rd_output_dir=str(tmp_path), rd_delay_ms=5, rd_failure_rate=0.1,
        rd_seed=23, rd_metrics_port=free_port()), "resource-domain")
    figures: dict[str, int] = {}

    released = 0

    async def settled() -> bool:
        assert rd.alive() and engine.alive(), "the Resource Domain or the engine exited"
        (row,) = await pg_fetch(settings.pg_dsn, SETTLED, pid, sale)
        figures.update(row)
        entries = await redis.xlen(keys.stream(pid))
        return (row["running"] + row["failed"] + row["released"] == row["rows"] == entries
                and row["unreturned"] == 0 and row["running"] == STOCK
                and row["released"] == released)
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=2)

    async def latest_order(p: int, uid: int) -> asyncpg.Record | None:
        return await pool.fetchrow(LATEST_ORDER, p, uid)
    try:
        await wait_for(settled, 120, "every order RUNNING or FAILED and every failure handed")
        first_failures = figures["failed"]
        running = [u for u in sorted(buyers)
                   if (await latest_order(pid, u))["status"] == "RUNNING"][:RELEASES]
        for uid in running:  # the owners give their instances back (DELETE .../order)
            assert (await request_release(gate, latest_order, pid, uid)).new is True
        released = RELEASES
        await wait_for(settled, 120, "every release RELEASED and its unit handed on")
    except Exception:
        print(engine.output()[-3000:], rd.output()[-3000:], figures)
        raise
    finally:
        rd.stop()
        engine.stop()
        await pool.close()
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        ledger = await read_ledger(redis, keys, pid, sale, STOCK, conn=conn)
        attempts = await conn.fetch(
            "SELECT i.attempts FROM resource_domain.instances i JOIN seckill_logs l"
            " USING (instance_id) WHERE l.product_id = $1", pid)
    finally:
        await conn.close()
        await gate.close()
        await redis.aclose()
    failures = figures["failed"]
    assert 0 < first_failures <= failures < WAITING - RELEASES
    returned = failures + RELEASES  # every failed and every released unit went on
    handed = [e.user_id for e in ledger.entries if e.turn is not None]
    assert handed == line[:returned]  # exactly the first N, in join order
    assert [e.turn for e in ledger.entries if e.turn is not None] == \
        list(range(1, returned + 1))
    assert len(ledger.waiting) == WAITING - returned
    assert len(attempts) == STOCK + returned and {a["attempts"] for a in attempts} == {1}
    assert ledger_problems(ledger) == []
