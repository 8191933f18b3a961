"""After sold out, end to end: gate -> engine -> Resource Domain -> status -> handoff.

Stock 100, 300 buyers, 150 of the others join the waitlist; one provisioning in ten
fails, and each failed order's unit goes to the head of the line in the refund script,
as an order the engine logs and the Resource Domain provisions like any other (a
handed order may fail too: its unit goes on to the next in line). So exactly the
first N waiting users get orders, N the failures, each provisioned once.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from redis.asyncio import Redis
from support import add_products, pg_fetch

from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.invariants import ledger_problems, read_ledger
from engine.testing.ports import free_port
from engine.testing.processes import EngineProcess, SeckillProcess, engine_env
from engine.testing.waits import wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("fresh_queues")]

STOCK, BUYERS, WAITING = 100, 300, 150

SETTLED = """
SELECT count(*) FILTER (WHERE status = 'RUNNING') AS running,
       count(*) FILTER (WHERE status = 'FAILED') AS failed,
       count(*) FILTER (WHERE status = 'FAILED' AND compensated_at IS NULL) AS unreturned,
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

    async def settled() -> bool:
        assert rd.alive() and engine.alive(), "the Resource Domain or the engine exited"
        (row,) = await pg_fetch(settings.pg_dsn, SETTLED, pid, sale)
        figures.update(row)
        entries = await redis.xlen(keys.stream(pid))
        return (row["running"] + row["failed"] == row["rows"] == entries
                and row["unreturned"] == 0 and row["running"] == STOCK)
    try:
        await wait_for(settled, 120, "every order RUNNING or FAILED and every failure handed")
    except Exception:
        print(engine.output()[-3000:], rd.output()[-3000:], figures)
        raise
    finally:
        rd.stop()
        engine.stop()
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
    assert 0 < failures < WAITING
    handed = [e.user_id for e in ledger.entries if e.turn is not None]
    assert handed == line[:failures]  # exactly the first N, in join order
    assert [e.turn for e in ledger.entries if e.turn is not None] == \
        list(range(1, failures + 1))
    assert len(ledger.waiting) == WAITING - failures
    assert len(attempts) == STOCK + failures and {a["attempts"] for a in attempts} == {1}
    assert ledger_problems(ledger) == []
