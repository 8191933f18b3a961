"""`make demo`: a flash sale on the local services, from the gate to the log.

Migrates, adds a GPU product, opens a sale, lets a burst of users race for
it through the gate, runs the engine (and the reference Resource Domain when
it is there) until every accepted order is RUNNING or FAILED, and prints a summary.
Safe to run again: each run opens a new sale and clears its buyers.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from engine.admin.migrate import migrate
from engine.config import Settings, load_settings
from engine.connections import connect_pg, connect_redis
from engine.gate.client import Gate
from engine.keys import GROUP, Keys
from engine.products import Product, upsert_product

PRODUCT = Product(1001, "GPU 计算实例", 8, 32768, "A100", "ubuntu:22.04")
STOCK = 300
USERS = 2000
ATTEMPTS = 5000
SECKILL = str(Path(sys.executable).with_name("seckill"))


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def burst(gate: Gate) -> Counter[str]:
    """ATTEMPTS purchase attempts from USERS users, 100 at a time, as fast as the gate goes."""
    outcomes: Counter[str] = Counter()
    users = [random.randint(1, USERS) for _ in range(ATTEMPTS)]

    async def worker(chunk: list[int]) -> None:
        for uid in chunk:
            outcomes[(await gate.buy(PRODUCT.id, uid)).outcome] += 1

    await asyncio.gather(*(worker(users[i::100]) for i in range(100)))
    return outcomes


async def pending_and_lag(settings: Settings) -> tuple[int, int]:
    redis = await connect_redis(settings)
    try:
        groups = await redis.xinfo_groups(Keys(settings.key_prefix).stream(PRODUCT.id))
    finally:
        await redis.aclose()
    g = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
    return int(g["pending"]), int(g["lag"] or 0)


async def summary(settings: Settings, sale: str) -> list[tuple[str, int]]:
    conn = await connect_pg(settings)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM seckill_logs "
                                "WHERE product_id = $1 AND sale_id = $2 GROUP BY status "
                                "ORDER BY status", PRODUCT.id, sale)
    finally:
        await conn.close()
    return [(r["status"], r["n"]) for r in rows]


async def prepare(settings: Settings) -> tuple[Gate, str]:
    for line in await migrate(settings):
        step(line)
    conn = await connect_pg(settings)
    try:
        await upsert_product(conn, PRODUCT)
    finally:
        await conn.close()
    redis = await connect_redis(settings)
    gate = Gate(redis, Keys(settings.key_prefix))
    sale = await gate.open_sale(PRODUCT.id, STOCK, clear_buyers=True)
    step(f"sale {sale} open: {PRODUCT.name}, {STOCK} units")
    return gate, sale


async def wait_final(settings: Settings, sale: str, expected: int) -> list[tuple[str, int]]:
    """Until every logged order of the sale is RUNNING or FAILED (or 60 s passed)."""
    deadline = time.monotonic() + 60
    while True:
        rows = await summary(settings, sale)
        final = sum(n for status, n in rows if status in ("RUNNING", "FAILED"))
        if final >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.5)


def check(accepted: int, rows: list[tuple[str, int]], stock_left: int) -> bool:
    """The sale's invariants, whatever the timing: every accepted order is logged once,
    and the units held by orders that did not fail are exactly the stock taken. A failed
    order's unit goes back on sale, so it may be sold again while the burst goes on."""
    logged = sum(n for _, n in rows)
    failed = dict(rows).get("FAILED", 0)
    resold = accepted - STOCK
    ok = logged == accepted and accepted - failed == STOCK - stock_left
    step(f"invariants hold: {accepted} accepted == {logged} logged; {accepted - failed} "
         f"sold == {STOCK} stock - {stock_left} left ({failed} failed, {resold} of their "
         "units sold again)" if ok else
         f"MISMATCH: accepted {accepted}, logged {logged}, failed {failed}, "
         f"stock {STOCK}, left {stock_left}")
    return ok


async def run_demo(settings: Settings) -> int:
    gate, sale = await prepare(settings)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    engine = subprocess.Popen([SECKILL, "run", "--workers", "2"], **quiet)  # type: ignore[call-overload]
    domain = subprocess.Popen([SECKILL, "resource-domain"], env={  # type: ignore[call-overload]
        **os.environ, "SECKILL_RD_FAILURE_RATE": "0.1", "SECKILL_RD_DELAY_MS": "200"}, **quiet)
    try:
        step(f"{ATTEMPTS} attempts from {USERS} users ...")
        stream = gate.keys.stream(PRODUCT.id)
        before = await gate.redis.xlen(stream)
        t0 = time.perf_counter()
        outcomes = await burst(gate)
        took = time.perf_counter() - t0
        step(f"gate: {dict(outcomes)} in {took:.2f}s ({ATTEMPTS / took:,.0f} attempts/s)")
        step(f"stream {stream}: {await gate.redis.xlen(stream) - before} new entries")
        deadline = time.monotonic() + 60
        while (pl := await pending_and_lag(settings)) != (0, 0):
            if time.monotonic() > deadline:
                step(f"engine still busy: pending {pl[0]}, lag {pl[1]}")
                return 1
            await asyncio.sleep(0.5)
        step("engine drained the stream: every accepted order logged and published")
        step("Resource Domain provisioning (10% simulated failures) ...")
        rows = await wait_final(settings, sale, outcomes["accepted"])
        state = await gate.sale_state(PRODUCT.id)
        print()
        print(f"  {'status':<12}{'orders':>8}")
        for status, n in rows:
            print(f"  {status:<12}{n:>8}")
        print(f"  {'(accepted)':<12}{outcomes['accepted']:>8}")
        print(f"  {'(stock left)':<12}{state.stock:>8}   units of failed orders, for sale again")
        print()
        return 0 if check(outcomes["accepted"], rows, state.stock or 0) else 1
    finally:
        for proc in (engine, domain):
            proc.send_signal(signal.SIGTERM)
        for proc in (engine, domain):
            proc.wait(60)
        await gate.redis.aclose()


def main() -> int:
    """The demo under the command line's error handling: a service failure is one line."""
    from engine.cli import guarded

    return guarded(lambda: asyncio.run(run_demo(load_settings())), prog="seckill demo")


if __name__ == "__main__":
    sys.exit(main())
