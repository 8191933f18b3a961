"""`python -m bench.cluster`: the engine on a 3-master Redis Cluster against the single Redis.

The same backlog (SALES open sales, ORDERS_PER_SALE orders each, preloaded) is drained
by `seckill run --workers 2` once with the single Redis and once with a local Redis
Cluster (3 masters, one replica each, started here on free ports); each run gets a
database and a RabbitMQ vhost of its own. Reported per run: seconds from the first read
to the last acknowledgement, orders per second, worker CPU microseconds per order and
the rows written; then the cluster/single ratios. Written to
bench/results/cluster-<time>.json and printed.

Wall times on a shared machine vary with whatever else runs; the CPU per order is the
steadier figure. `make bench` runs the same drains as phases of every round
(`suite_run`: the suite's database and vhost, a key prefix per run), judged in
bench/report.py. `profile=` on run_once samples the workers with py-spy (collapsed
stacks), as was done to find where the cluster's CPU went (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis

from bench.enginerun import TICK, Engine, group_counts
from bench.env import purge_queues
from engine.admin.brokerusers import ensure_broker_users
from engine.admin.migrate import apply_migrations, declare_topology
from engine.config import Settings, load_settings
from engine.connections import connect_redis
from engine.keys import GROUP, Keys
from engine.products import gpu_product, upsert_products
from engine.testing.clusters import LocalRedisCluster

RESULTS = Path(__file__).resolve().parent / "results"
SALES = 100
ORDERS_PER_SALE = 500
WORKERS = 2


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


async def preload(settings: Settings, pids: list[int], per_sale: int) -> None:
    """Sales announced and their orders in the streams, as the gate writes them."""
    redis = await connect_redis(settings)
    keys = Keys(settings.key_prefix)
    try:
        now = str(int(time.time()))
        for pid in pids:
            await redis.xgroup_create(keys.stream(pid), GROUP, id="0", mkstream=True)
            pipe = redis.pipeline(transaction=False)
            for slot in range(1, per_sale + 1):
                pipe.xadd(keys.stream(pid), {"uid": str(slot), "ts": now, "sale": "bench",
                                             "slot": str(slot)})
            await pipe.execute()
        await redis.sadd(keys.streams, *pids)
    finally:
        await redis.aclose()
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        await upsert_products(conn, [gpu_product(pid) for pid in pids])
    finally:
        await conn.close()


def profile_workers(engine: Engine, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the workers (collapsed stacks) until stopped: where their CPU goes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                             "--subprocesses", "--format", "raw", "--rate", "200",
                             "--pid", str(engine.proc.pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_once(settings: Settings, pids: list[int], total: int,
                   timeout: float, profile: Path | None = None) -> dict[str, Any]:
    redis = await connect_redis(settings)
    keys = Keys(settings.key_prefix)
    engine = Engine(settings, WORKERS)
    spy = None
    try:
        deadline = time.monotonic() + timeout
        while (await group_counts(redis, keys, pids))[0] == 0:
            if time.monotonic() > deadline or engine.proc.poll() is not None:
                return {"failed": "the engine never read"}
            await asyncio.sleep(0.005)
        if profile is not None:
            spy = profile_workers(engine, profile)
        t0, cpu0, workers = time.perf_counter(), engine.cpu(), engine.worker_pids()
        left = {pid: total // len(pids) for pid in pids}
        while left:
            if time.monotonic() > deadline or engine.proc.poll() is not None:
                return {"failed": f"{len(left)} of {len(pids)} sales not drained"}
            await asyncio.sleep(0.1)
            left = await undrained(redis, keys, left)
        seconds, cpu = time.perf_counter() - t0, engine.cpu() - cpu0
        if engine.worker_pids() != workers:
            # a respawned worker's CPU is lost with the dead one: the figure would flatter
            return {"failed": f"a worker died during the run (workers {workers}, then "
                              f"{engine.worker_pids()})"}
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        engine.stop()
        await redis.aclose()
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM seckill_logs WHERE product_id ="
                                   " ANY($1::bigint[])", pids)
    finally:
        await conn.close()
    out = {"orders": total, "seconds": seconds, "per_second": total / seconds, "rows": rows,
           "cpu_us_per_order": cpu / total * 1e6, "ticks": {"workers": round(cpu * TICK)},
           "tick_hz": TICK}
    if rows != total:
        out["failed"] = f"{rows:,} rows for {total:,} orders"
    return out


async def undrained(redis: Redis, keys: Keys, left: dict[int, int]) -> dict[int, int]:
    """The sales of `left` (pid -> orders) whose orders are not all acknowledged yet; only
    those are asked again, so polling a thousand sales does not load Redis all along."""
    pipe = redis.pipeline(transaction=False)
    for pid in left:
        pipe.xinfo_groups(keys.stream(pid))
    out = {}
    for (pid, orders), groups in zip(left.items(), await pipe.execute(), strict=True):
        group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
        if int(group["entries-read"] or 0) - int(group["pending"]) < orders:
            out[pid] = orders
    return out


async def forget(settings: Settings, pids: list[int]) -> None:
    """Delete a run's keys (its streams, dead letters, the set of streams)."""
    redis = await connect_redis(settings)
    keys = Keys(settings.key_prefix)
    try:
        pipe = redis.pipeline(transaction=False)
        for pid in pids:
            pipe.delete(keys.stream(pid))
            pipe.delete(keys.dlq(pid))
        pipe.delete(keys.streams)
        await pipe.execute()
    finally:
        await redis.aclose()


async def suite_run(settings: Settings, redis_url: str, sales: int, per_sale: int,
                    name: str) -> dict[str, Any]:
    """A phase of `make bench` (bench/__main__.py): one drain in the suite's database and
    vhost (no database or vhost of its own to create: seconds saved per run), with a key
    prefix of its own under the suite's, its keys deleted afterwards."""
    s = settings.replace(redis_url=redis_url,
                         key_prefix=f"{settings.key_prefix}{name}-{uuid.uuid4().hex[:6]}:")
    first = random.randrange(10**9, 9 * 10**9)
    pids = list(range(first, first + sales))
    await purge_queues(s)
    await preload(s, pids, per_sale)
    try:
        return await run_once(s, pids, sales * per_sale, timeout=120 + sales * per_sale / 500)
    finally:
        await forget(s, pids)


async def phase(base: Settings, redis_url: str, name: str, sales: int,
                per_sale: int, profile: Path | None = None) -> dict[str, Any]:
    """One drain with its own database, vhost and key prefix; both removed afterwards."""
    tag = f"{name}_{uuid.uuid4().hex[:6]}"
    dsn = _with_path(base.pg_dsn, f"/seckill_bench_{tag}")
    vhost = f"seckill-bench-{tag}"
    await asyncio.to_thread(apply_migrations, dsn)
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", vhost)
    user = urlsplit(base.amqp_url).username or "guest"
    await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*",
                            ".*")
    amqp = _with_path(base.amqp_url, "/" + quote(vhost, safe=""))
    settings = base.replace(redis_url=redis_url, pg_dsn=dsn, amqp_url=amqp,
                            key_prefix=f"bench:{tag}:", metrics_port=0, log_json=False)
    try:
        await declare_topology(amqp)
        await asyncio.to_thread(ensure_broker_users, settings)
        first = random.randrange(10**9, 9 * 10**9)
        pids = list(range(first, first + sales))
        print(f"{name}: preloading {sales * per_sale:,} orders in {sales} sales", flush=True)
        await preload(settings, pids, per_sale)
        result = await run_once(settings, pids, sales * per_sale,
                                timeout=120 + sales * per_sale / 500, profile=profile)
        print(f"{name}: {json.dumps(result)}", flush=True)
        return result
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_vhost", vhost)
        conn = await asyncpg.connect(base.pg_dsn, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "seckill_bench_{tag}" WITH (FORCE)')
        finally:
            await conn.close()


async def main_async(sales: int, per_sale: int) -> dict[str, Any]:
    base = load_settings()
    single = await phase(base, base.redis_url, "single", sales, per_sale)
    with LocalRedisCluster() as cluster:
        clustered = await phase(base, cluster.url, "cluster", sales, per_sale)
    out: dict[str, Any] = {"sales": sales, "orders": sales * per_sale, "workers": WORKERS,
                           "single": single, "cluster": clustered}
    if "failed" not in single and "failed" not in clustered:
        out["ratio"] = {
            "per_second": clustered["per_second"] / single["per_second"],
            "cpu_us_per_order": clustered["cpu_us_per_order"] / single["cpu_us_per_order"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sales", type=int, default=SALES)
    parser.add_argument("--orders-per-sale", type=int, default=ORDERS_PER_SALE)
    args = parser.parse_args(argv)
    out = asyncio.run(main_async(args.sales, args.orders_per_sale))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out.get("ratio", {}), indent=2))
    print(f"written to {path}")
    failed = [k for k in ("single", "cluster") if "failed" in out[k]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
