"""`make loadtest` (`python -m loadtest.run`): a flash-sale rehearsal, then the verifier.

Opens a sale, starts the HTTP gate (and, with --engine, the engine), runs
Locust headless, writes CSV and HTML reports to loadtest/reports/, waits for
the engine to drain, and exits non-zero if any invariant is violated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import aiormq
from redis.asyncio import Redis

from engine.admin.migrate import migrate
from engine.config import Settings, load_settings
from engine.connections import connect_pg, connect_redis
from engine.gate.client import Gate
from engine.keys import EXCHANGE, GROUP, RK_CREATED, Keys
from engine.products import Product, upsert_product

from .verify import report, tried_key, verify

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def open_sale(settings: Settings, pid: int, stock: int) -> str:
    await migrate(settings)
    conn = await connect_pg(settings)
    try:
        await upsert_product(conn, Product(pid, f"GPU rehearsal {pid}", 8, 32768, "A100",
                                           "ubuntu:22.04"))
    finally:
        await conn.close()
    redis = await connect_redis(settings)
    try:
        await redis.delete(tried_key(Keys(settings.key_prefix), pid))
        return await Gate(redis, Keys(settings.key_prefix)).open_sale(pid, stock,
                                                                      clear_buyers=True)
    finally:
        await redis.aclose()


async def declare_tap(settings: Settings) -> str:
    queue = f"loadtest-tap-{uuid.uuid4().hex[:8]}"
    conn = await aiormq.connect(settings.amqp_url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(queue, durable=True, arguments={"x-expires": 3_600_000})
        await channel.queue_bind(queue, EXCHANGE, routing_key=RK_CREATED)
    finally:
        await conn.close()
    return queue


async def drained(settings: Settings, pid: int, timeout: float) -> bool:
    redis = Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            groups = await redis.xinfo_groups(Keys(settings.key_prefix).stream(pid))
            g = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
            if int(g["pending"]) == 0 and int(g["lag"] or 0) == 0:
                return True
            await asyncio.sleep(0.25)
    finally:
        await redis.aclose()
    return False


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    p.add_argument("--users", type=int, default=2000, help="simulated users (each tries once)")
    p.add_argument("--spawn-rate", type=float, default=500, help="users started per second")
    p.add_argument("--run-time", default="30s", help="Locust run time, e.g. 30s or 2m")
    p.add_argument("--stock", type=int, default=300)
    p.add_argument("--product", type=int, default=2001)
    p.add_argument("--engine", action="store_true",
                   help="run the engine too and check rows, instance IDs and events")
    p.add_argument("--bff-workers", type=int, default=2)
    p.add_argument("--reports", type=Path, default=HERE / "reports")
    args = p.parse_args(argv)
    settings = load_settings()
    args.reports.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sale = asyncio.run(open_sale(settings, args.product, args.stock))
    say(f"sale {sale}: product {args.product}, stock {args.stock}")
    tap = asyncio.run(declare_tap(settings)) if args.engine else None
    port = free_port()
    env = dict(os.environ, SECKILL_LT_PRODUCT=str(args.product),
               SECKILL_LT_FINAL="PROCESSING,RUNNING,FAILED")
    bff = engine = None
    try:
        bff = start([str(BIN / "seckill"), "bff", "--port", str(port), "--workers",
                     str(args.bff_workers)], env, args.reports / f"{stamp}-bff.log")
        if args.engine:
            engine = start([str(BIN / "seckill"), "run", "--workers", "2"], env,
                           args.reports / f"{stamp}-engine.log")
        wait_http(f"http://127.0.0.1:{port}/healthz")
        say(f"locust: {args.users} users, {args.spawn_rate}/s, {args.run_time}")
        prefix = args.reports / stamp
        locust = subprocess.run(
            [str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
             "--host", f"http://127.0.0.1:{port}", "--csv", str(prefix),
             "--html", f"{prefix}.html", "--only-summary", "--stop-timeout", "10"],
            env=env)
        say(f"locust exited with {locust.returncode}; reports: {prefix}_stats.csv, "
            f"{prefix}.html")
        if args.engine and not asyncio.run(drained(settings, args.product, 60)):
            say("the engine did not drain in 60 s")
            return 1
        problems = asyncio.run(verify(settings, args.product, sale, args.stock,
                                      engine=args.engine, tap=tap))
    finally:
        stop(bff)
        stop(engine)
    return report(problems)


if __name__ == "__main__":
    sys.exit(main())
