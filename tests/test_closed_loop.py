"""Gate -> engine -> Resource Domain -> status, all real processes and services."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from support import SECKILL, EngineProcess, add_products, engine_env, stop_process, wait_for

from engine.gate import Gate
from engine.keys import Keys

pytestmark = pytest.mark.timeout(300)


class ResourceDomainProcess:
    def __init__(self, settings, **overrides) -> None:
        self.proc = subprocess.Popen([SECKILL, "resource-domain"],
                                     env=engine_env(settings, **overrides),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        stop_process(self.proc)


async def statuses(settings, pid) -> dict[str, int]:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) FROM seckill_logs WHERE product_id = $1"
                                " GROUP BY status", pid)
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


async def provisioned(settings, pid) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return await conn.fetch(
            "SELECT i.instance_id, i.attempts, i.status FROM resource_domain.instances i JOIN"
            " seckill_logs l USING (instance_id) WHERE l.product_id = $1", pid)
    finally:
        await conn.close()


async def buy_all(gate: Gate, pid: int, users: range) -> int:
    accepted = 0
    for start in range(0, len(users), 100):
        results = await asyncio.gather(*(gate.buy(pid, u) for u in users[start:start + 100]))
        accepted += sum(r.outcome == "accepted" for r in results)
    return accepted


async def test_2000_orders_end_running_or_failed_once_each(settings, product_id, tmp_path):
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 2000, clear_buyers=True)
    rd_env = {"rd_output_dir": str(tmp_path), "rd_delay_ms": 20, "rd_failure_rate": 0.1,
              "rd_seed": 7}
    engine = EngineProcess(settings, workers=2)
    rd = ResourceDomainProcess(settings, **rd_env)
    try:
        assert await buy_all(gate, product_id, range(1, 2001)) == 2000

        async def some_done() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) >= 500
        await wait_for(some_done, 90, "the first 500 orders provisioned")
        rd.stop()  # in the middle: unacknowledged events are redelivered to the next one
        rd = ResourceDomainProcess(settings, **rd_env)

        async def all_final() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) == 2000
        await wait_for(all_final, 180, "all 2,000 orders RUNNING or FAILED")
    finally:
        rd.stop()
        engine.stop()
        await redis.aclose()
    rows = await provisioned(settings, product_id)
    assert len(rows) == 2000 and {r["attempts"] for r in rows} == {1}
    assert len(list(Path(tmp_path).glob("*.yaml"))) == 2000
    final = await statuses(settings, product_id)
    assert 100 <= final["FAILED"] <= 320 and final["RUNNING"] + final["FAILED"] == 2000


async def test_failed_units_go_back_to_the_sale(settings, product_id, tmp_path):
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 200, clear_buyers=True)
    rd_env = {"rd_output_dir": str(tmp_path), "rd_delay_ms": 5, "rd_failure_rate": 0.2,
              "rd_seed": 11}
    engine = EngineProcess(settings, workers=2)
    rd = ResourceDomainProcess(settings, **rd_env)
    try:
        assert await buy_all(gate, product_id, range(1, 201)) == 200

        async def all_final() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) == 200
        await wait_for(all_final, 120, "the first 200 orders final")
        failed = (await statuses(settings, product_id))["FAILED"]

        async def all_returned() -> bool:
            return int(await redis.get(keys.stock(product_id))) == failed
        await wait_for(all_returned, 30, "every failed unit returned")
        assert 20 <= failed <= 60
        # other users buy the returned units; nobody gets more than the stock
        assert await buy_all(gate, product_id, range(1001, 1001 + 3 * failed)) == failed
        assert int(await redis.get(keys.stock(product_id))) == 0
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            compensated = await conn.fetchval(
                "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND "
                "compensated_at IS NOT NULL", product_id)
        finally:
            await conn.close()
        assert compensated >= failed  # later failures among the re-sold units count too
    finally:
        rd.stop()
        engine.stop()
        await redis.aclose()
