"""`python -m bench.gatebatch`: what one coalesced purchase and one batch cost the gate.

The BFF's purchases of one loop turn go to Redis together (`Gate(coalesce=True)`), and a
busy BFF's turns hold a handful of them where a client calling the gate in a loop holds
all its callers: what a batch costs, apart from what a call costs, is what a purchase
through the BFF pays above a purchase made directly. This measures both for the two
ways the gate sends a batch:

- `pipe`: ScriptPipe (engine/gate/pipe.py), the single Redis's path: one connection of
  its own, hiredis packing and parsing, one batch in flight;
- `routed`: RoutedScript (engine/gate/routed.py), the cluster's and WAIT's path through
  redis-py's connections, forced here onto the single Redis (the path a single Redis
  took before ScriptPipe).

For each, K buyers call the gate back to back from one process (every call a new
buyer, so every batch holds K calls), K in `CONCURRENCY`; the gate's CPU per call is
this process's CPU over the calls. Modes and K alternate, ROUNDS rounds, medians. A
least-squares fit of cpu(K) = per_call + per_batch / K gives the two costs. Written to
bench/results/gatebatch-<time>.json and printed as a table; run it under
`flock /tmp/seckill-heavy.lock` on a shared machine and read it as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from typing import Any

import uvloop

from engine.config import Settings
from engine.connections import connect_redis
from engine.gate.pipe import ScriptPipe
from engine.gate.redis_gate import Gate, Limits, _accepted
from engine.gate.routed import RoutedScript
from engine.keys import Keys

from .env import bench_settings, prepare
from .resultfiles import write_result

CONCURRENCY = (1, 4, 10, 32)
MODES = ("pipe", "routed")
PID = 990_000_900


async def calls(settings: Settings, mode: str, buyers: int, seconds: float) -> dict[str, float]:
    """`buyers` tasks buying back to back for `seconds`: CPU per call, calls per second."""
    redis = await connect_redis(settings, max_connections=buyers + 8)
    gate = Gate(redis, Keys(settings.key_prefix), coalesce=True, limits=Limits())
    if mode == "routed":
        gate._routed = RoutedScript(redis, gate._buy.source, None, wrote=_accepted)
    assert isinstance(gate._routed, ScriptPipe if mode == "pipe" else RoutedScript)
    await gate.open_sale(PID, 10**9, clear_buyers=True)
    users = itertools.count(1)
    done = 0
    end = 0.0

    async def buyer() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await gate.buy(PID, next(users), ip="127.0.0.1")
            done += 1

    try:
        end = time.perf_counter() + 0.3  # connected, script loaded, caches warm
        await asyncio.gather(*(buyer() for _ in range(buyers)))
        done = 0
        cpu, start = time.process_time(), time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(buyer() for _ in range(buyers)))
        cpu, took = time.process_time() - cpu, time.perf_counter() - start
    finally:
        await gate.close()
        await redis.aclose()
    return {"cpu_us_per_call": cpu / max(1, done) * 1e6, "calls_per_second": done / took}


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Least squares of cpu = per_call + per_batch / k: (per_call, per_batch)."""
    xs = [1 / k for k in points]
    ys = list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def run(settings: Settings, rounds: int, seconds: float) -> dict[str, Any]:
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        mode: {k: [] for k in CONCURRENCY} for mode in MODES}
    for r in range(rounds):
        for k in CONCURRENCY:
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                result = uvloop.run(calls(settings, mode, k, seconds))
                samples[mode][k].append(result)
                print(f"  round {r + 1}/{rounds} {mode:6} K={k:2}: "
                      f"{result['cpu_us_per_call']:6.1f} us/call "
                      f"{result['calls_per_second']:9,.0f} calls/s", flush=True)
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "modes": {}}
    for mode in MODES:
        med = {k: statistics.median(s["cpu_us_per_call"] for s in samples[mode][k])
               for k in CONCURRENCY}
        per_call, per_batch = fit(med)
        out["modes"][mode] = {
            "cpu_us_per_call": {str(k): v for k, v in med.items()},
            "calls_per_second": {str(k): statistics.median(
                s["calls_per_second"] for s in samples[mode][k]) for k in CONCURRENCY},
            "fit_per_call_us": per_call, "fit_per_batch_us": per_batch,
            "samples": {str(k): v for k, v in samples[mode].items()}}
    return out


def table(doc: dict[str, Any]) -> str:
    head = "| gate batch path | " + " | ".join(f"K={k} us/call" for k in CONCURRENCY) + \
        " | per call (fit) | per batch (fit) |"
    lines = [head, "|---|" + "---:|" * (len(CONCURRENCY) + 2)]
    for mode, m in doc["modes"].items():
        cells = " | ".join(f"{m['cpu_us_per_call'][str(k)]:.1f}" for k in CONCURRENCY)
        lines.append(f"| {mode} | {cells} | {m['fit_per_call_us']:.1f} | "
                     f"{m['fit_per_batch_us']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gatebatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    settings = bench_settings()
    prepare(settings)
    doc = run(settings, args.rounds, args.seconds)
    text = table(doc)
    path = write_result("gatebatch", doc, text)
    print(text)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
