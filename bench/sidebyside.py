"""`python -m bench.sidebyside`: two engine trees draining one backlog at the same time.

Alternated drains (bench.engineab) set variants minutes apart, and on these shared cores
a drain's CPU per order moves with the host: the same tree read 12.7 to 18.2 us per
order within ten minutes, PostgreSQL's and Redis's CPU per order moving with it (the
host's speed, not the engine's). A cost of a few percent cannot be seen through that.
Here each variant runs one worker (two engines, one worker each, their own consumer
names) in the same consumer group at the same time: the same backlog, the same
services, the same slow and quick moments. A worker's CPU per order is its CPU time
(the kernel's nanoseconds, bench.enginerun.cpu_ns), from
the moment the backlog is named (both booted and idle before, bench.enginerun.booted)
to the last acknowledgement, over the orders it logged: the rows of its snowflake
node, which its lease names. Which engine starts first alternates from drain to drain.

    python -m bench.sidebyside --a PYTHONPATH=/tmp/untraced --trace-b 0.01 [--drains 6]
        [--b-settings '{"trace_queue": 1}']

Prints each drain's CPU per order of both and B/A, and the ratio of all drains pooled
(each side's CPU summed over its orders summed); writes
bench/results/sidebyside-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from engine.keys import Keys
from engine.pipeline.ids import MAX_NODES, SEQ_BITS
from engine.testing.otlp import OtlpReceiver

from .abtest import variant
from .engineab import environment
from .enginerun import (
    Engine,
    _PhaseFailed,
    _problem,
    acked,
    booted,
    cpu_ns,
    cpu_ticks,
    tap_ids,
)
from .env import bench_settings, preload, prepare
from .env import reset as reset_services
from .resultfiles import write_result

PID = 990_000_050
SIDES = ("a", "b")


async def node_of(redis: Redis, keys: Keys, pid: int) -> int | None:
    """The snowflake node a worker process leased (its lease's owner names its PID)."""
    names = [keys.node(n) for n in range(MAX_NODES)]
    for start in range(0, MAX_NODES, 256):
        owners = await redis.mget(names[start:start + 256])
        for n, owner in enumerate(owners, start):
            text = owner.decode() if isinstance(owner, bytes) else owner
            if text is not None and text.split(":")[1] == str(pid):
                return n
    return None


def thread_ns(pid: int) -> dict[str, int]:
    """CPU nanoseconds of each thread of a process (its schedstat's first field), by
    `<tid> <name>`."""
    out = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        try:
            name = (task / "comm").read_text().strip()
            out[f"{task.name} {name}"] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


async def rows_by_node(settings: Any, pids: list[int]) -> dict[int, int]:
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        rows = await conn.fetch(
            f"SELECT (instance_id >> {SEQ_BITS}) & {MAX_NODES - 1} AS node, count(*) AS n "
            "FROM seckill_logs WHERE product_id = ANY($1) GROUP BY node", pids)
    finally:
        await conn.close()
    return {r["node"]: r["n"] for r in rows}


async def drain_pair(settings: Any, envs: dict[str, dict[str, str]],
                     overrides: dict[str, dict[str, Any]], orders: int, traced: float,
                     first: str, timeout: float = 120.0,
                     reset: Callable[[list[int]], Awaitable[None]] | None = None,
                     pid: int = PID) -> dict[str, Any]:
    """One backlog of `orders` in sale `pid`, a share `traced` of them sampled, drained
    by one worker of each side at once; `reset` empties the services before (default:
    env.reset)."""
    pids = [pid]
    keys = Keys(settings.key_prefix)
    if reset is None:
        await reset_services(settings, pids, quiet_wait=15.0)
    else:
        await reset(pids)
    await preload(settings, pids, orders, traced=traced)
    redis = Redis.from_url(settings.redis_url)
    await redis.srem(keys.streams, *pids)  # (named once both booted)
    engines: dict[str, Engine] = {}
    try:
        for side in (first, *(s for s in SIDES if s != first)):
            with environment(envs[side]):
                engines[side] = Engine(settings, 1, engine_id=f"side-{side}",
                                       **overrides[side])
        deadline = time.monotonic() + timeout
        for engine in engines.values():
            await booted(engine, deadline)
        workers = {side: e.worker_pids()[0] for side, e in engines.items()}
        nodes = {side: await node_of(redis, keys, pid) for side, pid in workers.items()}
        start = {side: cpu_ticks(pid) for side, pid in workers.items()}
        start_ns = {side: cpu_ns(pid) for side, pid in workers.items()}
        threads = {side: thread_ns(pid) for side, pid in workers.items()}
        t0 = time.perf_counter()
        await redis.sadd(keys.streams, *pids)
        done = 0
        while done < orders:
            for side, engine in engines.items():
                if problem := _problem(engine, deadline):
                    raise _PhaseFailed(f"engine {side}: {problem}: {done:,} of {orders:,} "
                                       "acknowledged")
            await asyncio.sleep(0.05)
            done = await acked(redis, keys, pids)
        used = {side: cpu_ns(pid) - start_ns[side] for side, pid in workers.items()}
        ticks = {side: cpu_ticks(pid) - start[side] for side, pid in workers.items()}
        threads = {side: {t: n - threads[side].get(t, 0) for t, n in thread_ns(pid).items()}
                   for side, pid in workers.items()}
        seconds = time.perf_counter() - t0
    except _PhaseFailed as exc:
        return {"failed": str(exc)}
    finally:
        for engine in engines.values():
            engine.stop()
        await redis.aclose()
    rows = await rows_by_node(settings, pids)
    await tap_ids(settings)  # (the tap queue emptied for the next drain)
    out: dict[str, Any] = {"orders": orders, "seconds": seconds, "first": first}
    for side in SIDES:
        node = nodes[side]
        logged = rows.get(node, 0) if node is not None else 0
        out[side] = {"ticks": ticks[side], "cpu_ns": used[side], "orders": logged,
                     "node": nodes[side], "threads": threads[side],
                     "cpu_us_per_order": used[side] / 1e3 / logged if logged else None}
    if sum(out[s]["orders"] for s in SIDES) != orders:
        out["failed"] = (f"rows of the two workers' nodes: {out['a']['orders']:,} + "
                         f"{out['b']['orders']:,}, not {orders:,}")
    elif all(out[s]["cpu_us_per_order"] for s in SIDES):
        out["b_over_a"] = out["b"]["cpu_us_per_order"] / out["a"]["cpu_us_per_order"]
    return out


def pooled(drains: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side's CPU over its orders, every good drain summed, and B over A."""
    good = [d for d in drains if "b_over_a" in d]
    out: dict[str, Any] = {"drains": len(good), "failed": len(drains) - len(good)}
    for side in SIDES:
        used = sum(d[side]["cpu_ns"] for d in good)
        orders = sum(d[side]["orders"] for d in good)
        out[side] = used / 1e3 / orders if orders else None
    if out["a"] and out["b"]:
        out["b_over_a"] = out["b"] / out["a"]
    out["each"] = sorted(d["b_over_a"] for d in good)
    return out


async def run(settings: Any, envs: dict[str, dict[str, str]], traced: dict[str, float],
              drains: int, orders: int, share: float | None = None,
              extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`share`: of the backlog's entries, those that carry a sampled context (default: the
    larger trace_sample, as the gate of a BFF at that ratio writes them); `extra`: more
    settings of a side (by "a", "b")."""
    share = max(traced.values()) if share is None else share
    receiver = OtlpReceiver(keep=False).start() if max(traced.values()) else None
    overrides = {side: {"trace_sample": traced[side], "trace_endpoint": receiver.endpoint}
                 if traced[side] and receiver else {} for side in SIDES}
    for side, more in (extra or {}).items():
        overrides[side].update(more)
    results = []
    try:
        for i in range(drains):
            d = await drain_pair(settings, envs, overrides, orders, share, SIDES[i % 2])
            results.append(d)
            print(f"  drain {i + 1}/{drains} ({d.get('first', '?').upper()} first): " + (
                f"FAILED {d['failed']}" if d.get("failed") else
                f"A {d['a']['cpu_us_per_order']:5.2f} us/order ({d['a']['orders']:,}), "
                f"B {d['b']['cpu_us_per_order']:5.2f} us/order ({d['b']['orders']:,}), "
                f"B/A {d['b_over_a']:.3f}"), flush=True)
    finally:
        if receiver is not None:
            receiver.stop()
    return {"envs": envs, "traced": traced, "share": share, "orders": orders,
            "settings": extra or {},
            "drains": results,
            "pooled": pooled(results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sidebyside", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="", help="side A's environment, K=V[,K=V]")
    p.add_argument("--b", default="", help="side B's environment, K=V[,K=V]")
    p.add_argument("--trace-a", type=float, default=0.0, help="side A's trace_sample")
    p.add_argument("--trace-b", type=float, default=0.0, help="side B's trace_sample")
    p.add_argument("--drains", type=int, default=6)
    p.add_argument("--orders", type=int, default=90_000)
    p.add_argument("--share", type=float, default=None,
                   help="the backlog's sampled share (default: the larger --trace-*)")
    p.add_argument("--b-settings", type=orjson.loads, default={},
                   help='side B\'s other settings, JSON: \'{"trace_queue": 1}\'')
    args = p.parse_args(argv)
    settings = bench_settings()
    prepare(settings)
    doc = asyncio.run(run(settings, {"a": variant(args.a), "b": variant(args.b)},
                          {"a": args.trace_a, "b": args.trace_b}, args.drains, args.orders,
                          args.share, {"b": args.b_settings} if args.b_settings else None))
    m = doc["pooled"]
    if m.get("b_over_a"):
        each = ", ".join(f"{v:.3f}" for v in m["each"])
        print(f"A {m['a']:.2f} us/order, B {m['b']:.2f} us/order over {m['drains']} drains: "
              f"B/A {m['b_over_a']:.3f} (each drain: {each})")
    print(f"written: {write_result('sidebyside', doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
