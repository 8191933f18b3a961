"""`python -m bench.durability`: what each gate durability choice costs, same cluster, same run.

A local Redis Cluster (3 masters, one replica each, started here on free ports) takes
purchases from the gate called directly, as the BFF calls it (attempts of one loop
turn coalesced, `CONCURRENCY` buyers at once, every attempt a new buyer of one of
`PRODUCTS` products spread over the masters), in three modes:

- `none`: no durability setting (a failover loses what the replica had not received);
  the gate's own cluster path (per master, one connection each);
- `min_replicas`: `min-replicas-to-write 1` (and `min-replicas-max-lag 10`) on every
  master, what `gate_min_replicas = 1` requires (a failover can lose the last lag);
- `wait`: `gate_wait_replicas = 1`, `gate_wait_ms = WAIT_MS` (WAIT after the accepted
  purchases of a batch, on their connection: a 202 only once a replica has them);
- `wait_5ms`: the same with 5 ms: how many purchases a tight timeout turns into 503s
  (unreplicated) when the replicas are merely busy.
(Until the gate's redis-py cluster pipeline was removed, a `pipeline` mode measured it:
0.64 of `none`'s rate in bench/results/durability-20261130-074429.json.)

Each round runs the three modes in turn for `SECONDS` each; the result per mode is the
median over the rounds of purchases per second, of the gate's CPU per purchase (this
process: the client side) and of the p50/p99 latency of one purchase, and the ratios
against `none`. Written to bench/results/durability-<time>.json
and printed as a table. Wall-clock figures on a shared 2-core machine: run it under
`flock /tmp/seckill-heavy.lock`, and read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis
import uvloop

from engine.config import Settings, load_settings
from engine.connections import connect_redis
from engine.gate.redis_gate import Gate
from engine.gate.routed import WaitFor
from engine.keys import Keys
from engine.testing.clusters import LocalRedisCluster

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("none", "min_replicas", "wait", "wait_5ms")
PRODUCTS = 30
CONCURRENCY = 64
SECONDS = 4.0
ROUNDS = 5
WAIT_MS = 50
FIRST_PID = 990_100_000


def set_min_replicas(cluster: LocalRedisCluster, replicas: int) -> None:
    """min-replicas-to-write on every master (0 = off), as an operator would."""
    for node in cluster.serving():
        client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)
        client.config_set("min-replicas-max-lag", 10)
        client.config_set("min-replicas-to-write", replicas)
        client.close()


async def window(gate: Gate, pids: list[int], first_user: int, seconds: float,
                 concurrency: int) -> dict[str, Any]:
    """`concurrency` buyers for `seconds`; every attempt a new user. Returns the rate,
    the latency percentiles and the outcomes."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    users = iter(range(first_user, first_user + 10**9))
    deadline = time.perf_counter() + seconds
    cpu = time.process_time()

    async def buyer() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            result = await gate.buy(random.choice(pids), next(users))
            latencies.append(time.perf_counter() - started)
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(buyer() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    return {"purchases": len(latencies), "per_second": len(latencies) / elapsed,
            "cpu_us": 1e6 * cpu / len(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "outcomes": outcomes}


async def run(settings: Settings, cluster: LocalRedisCluster, rounds: int, seconds: float,
              concurrency: int) -> dict[str, list[dict[str, Any]]]:
    client = await connect_redis(settings, max_connections=1024)
    keys = Keys(f"bench:durability:{random.randrange(10**9)}:")
    pids = list(range(FIRST_PID, FIRST_PID + PRODUCTS))
    gates = {"none": Gate(client, keys, coalesce=True),
             "min_replicas": Gate(client, keys, coalesce=True),
             "wait": Gate(client, keys, coalesce=True, wait=WaitFor(1, WAIT_MS)),
             "wait_5ms": Gate(client, keys, coalesce=True, wait=WaitFor(1, 5))}
    for pid in pids:
        await gates["none"].open_sale(pid, 2**31 - 1)
    await window(gates["none"], pids, 1, 1.0, concurrency)  # warm the connections up
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    user = 10**7
    try:
        for number in range(1, rounds + 1):
            for mode in MODES:
                set_min_replicas(cluster, 1 if mode == "min_replicas" else 0)
                result = await window(gates[mode], pids, user, seconds, concurrency)
                user += 10**7
                runs[mode].append(result)
                print(f"round {number} {mode:<13} {result['per_second']:>9,.0f}/s  "
                      f"{result['cpu_us']:.0f} us CPU  "
                      f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                      f"{result['outcomes']}", flush=True)
    finally:
        set_min_replicas(cluster, 0)
        await client.aclose()
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per mode over the rounds, and the ratios against `none`."""
    modes = {mode: {key: statistics.median(r[key] for r in results)
                    for key in ("per_second", "cpu_us", "p50_ms", "p99_ms")}
             for mode, results in runs.items()}
    base = modes["none"]
    ratio = {mode: {key: m[key] / base[key] for key in ("per_second", "cpu_us", "p99_ms")}
             for mode, m in modes.items() if mode != "none"}
    unreplicated = {mode: sum(r["outcomes"].get("unreplicated", 0) for r in results)
                    / sum(r["purchases"] for r in results) for mode, results in runs.items()}
    # every attempt a new buyer with stock left: anything but accepted (or, for the
    # WAIT modes, unreplicated) is a broken run
    broken = {mode: sorted({o for r in results for o in r["outcomes"]}
                           - {"accepted", "unreplicated"}) for mode, results in runs.items()}
    return {"modes": modes, "ratio": ratio, "unreplicated_share": unreplicated,
            "broken": {mode: b for mode, b in broken.items() if b}}


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'mode':<14}{'purchases/s':>13}{'CPU us':>8}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'rate vs none':>14}{'CPU vs none':>13}{'p99 vs none':>13}"]
    for mode, m in summary["modes"].items():
        r = summary["ratio"].get(mode, {"per_second": 1.0, "cpu_us": 1.0, "p99_ms": 1.0})
        lines.append(f"{mode:<14}{m['per_second']:>13,.0f}{m['cpu_us']:>8.0f}"
                     f"{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}{r['per_second']:>14.2f}"
                     f"{r['cpu_us']:>13.2f}{r['p99_ms']:>13.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)
    with LocalRedisCluster() as cluster:
        settings = load_settings().replace(redis_url=cluster.url)
        runs = uvloop.run(run(settings, cluster, args.rounds, args.seconds, args.concurrency))
    summary = summarize(runs)
    out = {"cluster": "3 masters, 1 replica each (local)", "products": PRODUCTS,
           "concurrency": args.concurrency, "seconds": args.seconds, "rounds": args.rounds,
           "wait_ms": WAIT_MS, **summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"durability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary))
    print(f"written to {path}")
    for mode, share in summary["unreplicated_share"].items():
        if share:
            print(f"{mode}: {share:.2%} of the purchases answered 503 unreplicated")
    return 1 if summary["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
