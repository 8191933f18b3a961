"""`make loadtest` (`python -m loadtest.run`): a flash-sale rehearsal, then the verifier.

Opens a sale, starts the HTTP gate (or uses the one at --host; with --engine,
starts the engine too), runs Locust headless, writes CSV and HTML reports to
loadtest/reports/, waits for the engine to drain, and exits non-zero, with the
reasons printed, if Locust's own reports fail the run (Locust failed, any 5xx or
timeout, failures above --max-failure-ratio: see loadtest/judge.py) or any
invariant is violated.
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
from engine.amqp.topology import EXCHANGE, RK_CREATED
from engine.config import Settings, load_settings
from engine.connections import connect_pg, connect_redis
from engine.gate.client import Gate
from engine.keys import GROUP, Keys
from engine.products import Product, upsert_product

from .judge import MAX_FAILURE_RATIO, RehearsalFailed, judge, read_report
from .verify import report, tried_key, verify

HERE = Path(__file__).resolve().parent
REPORT_FILES = ("_summary.json", "_stats.csv", "_failures.csv", "_exceptions.csv",
                "_stats_history.csv")
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
    redis = Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=10)
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
    raise RehearsalFailed(f"the BFF did not answer {url} within {timeout:.0f} s")


def bff_env(env: dict[str, str]) -> dict[str, str]:
    """The BFF's environment: without a signing key (SECKILL_LT_SIGNING_KEY) the users
    send no token, so the BFF must name buyers by the body (bff_auth = "none")."""
    if env.get("SECKILL_LT_SIGNING_KEY"):
        return env
    return dict(env, SECKILL_BFF_AUTH="none")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=2000, help="simulated users (each tries once)")
    p.add_argument("--spawn-rate", type=float, default=500, help="users started per second")
    p.add_argument("--run-time", default="30s", help="Locust run time, e.g. 30s or 2m")
    p.add_argument("--stock", type=int, default=300)
    p.add_argument("--product", type=int, default=2001)
    p.add_argument("--engine", action="store_true",
                   help="run the engine too and check rows, instance IDs and events")
    p.add_argument("--bff-workers", type=int, default=2)
    p.add_argument("--host", help="rehearse against the BFF at this URL (it must use the same "
                   "Redis) instead of starting one")
    p.add_argument("--max-failure-ratio", type=float, default=MAX_FAILURE_RATIO,
                   help="share of failed requests above which the run fails "
                   "(default %(default)s; any 5xx or timeout fails it anyway)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds before a request counts as timed out (default %(default)s)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                   help="Locust processes (default: one per core, %(default)s here): one "
                   "Locust process tops out near 1,200 requests/s, below the BFF")
    p.add_argument("--reports", type=Path, default=HERE / "reports")
    return p.parse_args(argv)


def run_locust(args: argparse.Namespace, host: str, env: dict[str, str],
               prefix: Path) -> list[str]:
    """Run Locust headless against `host`; the reasons its own reports fail the run."""
    say(f"locust: {args.users} users, {args.spawn_rate}/s, {args.run_time}, "
        f"{args.processes} process(es)")
    cmd = [str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
           "--host", host, "--csv", str(prefix), "--html", f"{prefix}.html",
           "--only-summary", "--stop-timeout", "10"]
    if args.processes > 1:  # a master plus this many workers, forked by Locust itself
        cmd += ["--processes", str(args.processes)]
    for stale in REPORT_FILES:  # a report left by an earlier run must not be read as ours
        Path(f"{prefix}{stale}").unlink(missing_ok=True)
    # Locust stops by itself after --run-time; the margin covers its start and stop.
    # its own session: the worker processes it forks are waited for too (they outlive
    # the master by up to --stop-timeout, and must not buy while the verifier reads)
    locust = subprocess.Popen(cmd, env=dict(env, SECKILL_LT_SUMMARY=f"{prefix}_summary.json"),
                              start_new_session=True)
    try:
        returncode = locust.wait(timeout=_seconds(args.run_time) + 120)
    except subprocess.TimeoutExpired:
        returncode = -1
    reap_group(locust.pid, timeout=15)
    locust_report = read_report(Path(f"{prefix}_summary.json"))
    counts = ("no stats" if locust_report.requests is None else
              f"{locust_report.requests} requests, {locust_report.failures} failures")
    say(f"locust exited with {returncode}: {counts}; reports: {prefix}_stats.csv, "
        f"{prefix}.html")
    return judge(returncode, locust_report, args.max_failure_ratio)


def reap_group(pgid: int, timeout: float) -> None:
    """Wait for every process of the group `pgid` to exit; SIGKILL what is left after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises once the group is empty
            time.sleep(0.1)
        say(f"locust processes still running after {timeout:.0f} s: killed")
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _seconds(run_time: str) -> float:
    """Locust's --run-time (`90`, `30s`, `2m`, `1h30m`) in seconds; 0 if it is not one."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for ch in run_time.strip():
        if ch.isdigit():
            number += ch
        elif ch in units and number:
            total, number = total + int(number) * units[ch], ""
        else:
            return 0.0
    return total + (int(number) if number else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    args.reports.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sale = asyncio.run(open_sale(settings, args.product, args.stock))
    say(f"sale {sale}: product {args.product}, stock {args.stock}")
    tap = asyncio.run(declare_tap(settings)) if args.engine else None
    env = dict(os.environ, SECKILL_LT_PRODUCT=str(args.product),
               SECKILL_LT_FINAL="PROCESSING,RUNNING,FAILED",
               SECKILL_LT_TIMEOUT=str(args.request_timeout))
    host = args.host or f"http://127.0.0.1:{free_port()}"
    bff = engine = None
    try:
        if args.host is None:
            bff = start([str(BIN / "seckill"), "bff", "--port", host.rsplit(":", 1)[1],
                         "--workers", str(args.bff_workers)], bff_env(env),
                        args.reports / f"{stamp}-bff.log")
        if args.engine:
            engine = start([str(BIN / "seckill"), "run", "--workers", "2"], env,
                           args.reports / f"{stamp}-engine.log")
        wait_http(f"{host.rstrip('/')}/healthz")
        failed = run_locust(args, host, env, args.reports / stamp)
        if args.engine and not asyncio.run(drained(settings, args.product, 60)):
            failed.append("the engine did not drain in 60 s")
        problems = asyncio.run(verify(settings, args.product, sale, args.stock,
                                      engine=args.engine, tap=tap))
    except RehearsalFailed as exc:
        print(f"LOAD TEST FAILED: {exc} (the verifier did not run)")
        return 1
    finally:
        stop(bff)
        stop(engine)
    verdict = report(problems)
    for reason in failed:
        print(f"LOAD TEST FAILED: {reason}")
    return 1 if failed else verdict


if __name__ == "__main__":
    sys.exit(main())
