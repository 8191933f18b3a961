"""`make demo`: a flash sale on the local services, from the gate to the log.

Migrates, adds a GPU product, opens a sale, lets a burst of logged-in users
race for it through the HTTP gate (`seckill bff` with authentication on: each
user holds a token minted with the development key of `seckill keys init`),
runs the engine (and the reference Resource Domain when
it is there) until every accepted order is RUNNING or FAILED, and prints a summary.
Safe to run again: each run opens a new sale and clears its buyers.

The burst is paced by the demo's own httpx client, which costs far more CPU a request
than the gate does, so its attempts per second are the client's pace, not the gate's
capacity (that is `make bench`'s). The demo says so, with the CPU each side spent.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from engine.admin.migrate import migrate
from engine.config import Settings, load_settings
from engine.connections import connect_pg, connect_redis
from engine.errors import ServiceUnavailable
from engine.gate.devkeys import DEFAULT_DIR, DevIssuer, init_keys
from engine.gate.redis_gate import Gate
from engine.keys import GROUP, Keys
from engine.products import Product, upsert_product

PRODUCT = Product(1001, "GPU 计算实例", 8, 32768, "A100", "ubuntu:22.04")
STOCK = 300
USERS = 2000
ATTEMPTS = 5000
SECKILL = str(Path(sys.executable).with_name("seckill"))


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds (user + system) used so far by a process and its descendants, those
    still running and those reaped: the BFF's Granian workers are its children. None
    where there is no /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[int, tuple[int, float]] = {}  # pid: (parent, seconds)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # utime, stime, then cutime, cstime: the reaped children's
        usage[int(stat.parent.name)] = (int(fields[1]), sum(map(int, fields[11:15])) / ticks)
    if root not in usage:
        return None
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, (parent, _) in usage.items() if parent in tree}
        grew = not children <= tree
        tree |= children
    return sum(usage[pid][1] for pid in tree)


def pace_line(took: float, client_cpu: float, gate_cpu: float | None) -> str:
    """What the burst measured: the client's pace, and who spent the CPU."""
    line = (f"client-paced: {ATTEMPTS} attempts in {took:.2f} s through one httpx client "
            f"({ATTEMPTS / took:,.0f}/s); CPU spent: the client {client_cpu:.1f} s")
    if gate_cpu is not None:
        line += (f", the HTTP gate {gate_cpu:.1f} s "
                 f"({gate_cpu / ATTEMPTS * 1e6:,.0f} us an attempt)")
    return line + ". The gate's own capacity: `make bench`"


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


OUTCOME = {202: "accepted", 409: "duplicate", 410: "sold_out", 404: "no_sale"}


def log_in(settings: Settings, private_key: Path) -> dict[int, dict[str, str]]:
    """Every demo user's request headers: a bearer token for its own user ID."""
    issuer = DevIssuer(private_key, issuer=settings.bff_jwt_issuer,
                       audience=settings.bff_jwt_audience)
    return {uid: {"authorization": "Bearer " + issuer.token(uid, ttl=900)}
            for uid in range(1, USERS + 1)}


async def burst(url: str, logins: dict[int, dict[str, str]]) -> Counter[str]:
    """ATTEMPTS purchase attempts from USERS users over HTTP, 100 at a time, as fast as
    the gate goes; each user buys with its own token (no user_id in the body)."""
    outcomes: Counter[str] = Counter()
    users = [random.randint(1, USERS) for _ in range(ATTEMPTS)]

    async def worker(client: httpx.AsyncClient, chunk: list[int]) -> None:
        for uid in chunk:
            r = await client.post(f"/api/v1/seckill/{PRODUCT.id}", headers=logins[uid])
            outcomes[OUTCOME.get(r.status_code, f"HTTP {r.status_code}")] += 1

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        await asyncio.gather(*(worker(client, users[i::100]) for i in range(100)))
    return outcomes


def start_bff(jwks: Path) -> tuple[subprocess.Popen, str]:
    """`seckill bff` with authentication on, on a free port; returns once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SECKILL_BFF_AUTH": "jwt", "SECKILL_BFF_JWKS": str(jwks)}
    proc = subprocess.Popen([SECKILL, "bff", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).json().get("auth") == "jwt":
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise ServiceUnavailable(f"the HTTP gate did not start on {url}")


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
    jwks, private_key = init_keys(DEFAULT_DIR)
    step(f"development keys: {jwks} (public), {private_key} (private, mode 600)")
    logins = log_in(settings, private_key)
    step(f"{USERS} users logged in (tokens minted with the development key)")
    bff, url = start_bff(jwks)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    engine = subprocess.Popen([SECKILL, "run", "--workers", "2"], **quiet)  # type: ignore[call-overload]
    domain = subprocess.Popen([SECKILL, "resource-domain"], env={  # type: ignore[call-overload]
        **os.environ, "SECKILL_RD_FAILURE_RATE": "0.1", "SECKILL_RD_DELAY_MS": "200"}, **quiet)
    try:
        step(f"{ATTEMPTS} attempts from {USERS} users through the HTTP gate at {url} ...")
        stream = gate.keys.stream(PRODUCT.id)
        before = await gate.redis.xlen(stream)
        gate_cpu, client_cpu = tree_cpu_seconds(bff.pid), time.process_time()
        t0 = time.perf_counter()
        outcomes = await burst(url, logins)
        took = time.perf_counter() - t0
        client_cpu = time.process_time() - client_cpu
        gate_after = tree_cpu_seconds(bff.pid)
        gate_cpu = None if gate_cpu is None or gate_after is None else gate_after - gate_cpu
        step(f"gate: {dict(outcomes)}")
        step(pace_line(took, client_cpu, gate_cpu))
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
        for proc in (engine, domain, bff):
            proc.send_signal(signal.SIGTERM)
        for proc in (engine, domain, bff):
            proc.wait(60)
        await gate.redis.aclose()


def main() -> int:
    """The demo under the command line's error handling: a service failure is one line."""
    from engine.cli import guarded

    return guarded(lambda: asyncio.run(run_demo(load_settings())), prog="seckill demo")


if __name__ == "__main__":
    sys.exit(main())
