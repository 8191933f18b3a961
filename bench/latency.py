"""Latency under an open-loop load: orders arrive on a schedule, not when we are ready.

A closed loop (send, wait, send) hides queueing; here a producer adds orders
at a fixed rate whatever the engine does, and the engine's own histogram of
"entry creation -> acknowledgement" is read before and after the window, so
warm-up is not part of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from typing import Any

from redis.asyncio import Redis

from engine.config import Settings
from engine.keys import GROUP, Keys
from engine.testing.ports import free_port

from .enginerun import Engine, acked
from .env import bench_settings, prepare, reset

METRIC = "seckill_order_latency_seconds_bucket"
WARM_UP_TIMEOUT = 60.0
STAGE_METRIC = "seckill_stage_duration_seconds_bucket"
STAGES = ("prepare", "log", "publish", "ack")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def buckets_of(text: str, metric: str = METRIC, label: str = "") -> dict[float, float]:
    """Cumulative bucket counts of one histogram (its lines holding `label`), summed
    over workers."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(metric) and label in line:
            le = re.search(r'le="([^"]+)"', line)
            if le:
                bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def quantile(buckets: dict[float, float], q: float) -> float:
    """histogram_quantile: linear interpolation inside the bucket, as Prometheus does."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 0)
        prev_bound, prev_count = bound, count
    return bounds[-1]


def max_bound(buckets: dict[float, float]) -> float:
    """Upper bound of the highest bucket that received anything: max <= this."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    return next(b for b in bounds if buckets[b] >= total)


# The producer stands in for the gate, which runs on other hosts in production: one
# script call per tick adds the tick's orders inside Redis, so the load generator costs
# next to no CPU on the cores it shares with the engine and its services.
PRODUCE = """
local first, count, ts = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = first, first + count - 1 do
  redis.call('XADD', KEYS[1], '*', 'uid', i, 'ts', ts, 'sale', 'lat', 'slot', i)
end
return count
"""


async def produce(settings: Settings, pid: int, rate: float, seconds: float,
                  first: int = 1) -> int:
    """XADD `rate` orders per second for `seconds`, in 10 ms ticks, open loop; users and
    units of stock numbered from `first`, so every order is a new one."""
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    add = redis.register_script(PRODUCE)
    stream = keys.stream(pid)
    sent = 0
    start = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(rate * elapsed) - sent
            if due > 0:
                await add(keys=[stream], args=[first + sent, due, int(time.time())])
                sent += due
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
    return sent


async def measure(settings: Settings, pid: int, rate: float, seconds: float,
                  port: int, drain_timeout: float = 60.0) -> dict[str, Any]:
    """Percentiles of the orders produced at `rate` for `seconds`. If they are not all
    acknowledged within `drain_timeout` after the window, the run is failed (its
    percentiles would leave out the slowest orders), not cut short in silence."""
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    await redis.xgroup_create(keys.stream(pid), GROUP, id="0", mkstream=True)
    await redis.sadd(keys.streams, pid)
    engine = Engine(settings.replace(metrics_port=port), 2)
    failed = None
    try:
        await _wait_ready(port)
        warm = await produce(settings, pid, rate, 1.0)  # warm-up: caches, connections
        if not await _drained(redis, keys, pid, warm, WARM_UP_TIMEOUT):
            return {"rate": rate, "seconds": seconds, "orders": 0,
                    "failed": f"the warm-up was not drained in {WARM_UP_TIMEOUT:.0f} s"}
        before = scrape(port)
        sent = await produce(settings, pid, rate, seconds, first=warm + 1)
        if not await _drained(redis, keys, pid, warm + sent, drain_timeout):
            done = await acked(redis, keys, [pid]) - warm
            failed = (f"drain timed out after {drain_timeout:.0f} s: {done:,} of {sent:,} "
                      "orders acknowledged, the percentiles cover only those")
        after = scrape(port)
    finally:
        engine.stop()
        await redis.aclose()
    window = _window(before, after)
    return {"rate": rate, "seconds": seconds, "orders": sent,
            **({"failed": failed} if failed else {}),
            "p50_ms": quantile(window, 0.50) * 1000, "p95_ms": quantile(window, 0.95) * 1000,
            "p99_ms": quantile(window, 0.99) * 1000, "max_le_ms": max_bound(window) * 1000,
            "cdf": [(b, c) for b, c in sorted(window.items()) if b != float("inf")],
            "count": window.get(float("inf"), 0.0), "stages": _stages(before, after)}


async def _drained(redis: Redis, keys: Keys, pid: int, orders: int, timeout: float) -> bool:
    """Wait until `orders` entries are acknowledged; False at the deadline."""
    deadline = time.monotonic() + timeout
    while await acked(redis, keys, [pid]) < orders:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def _window(before: str, after: str, metric: str = METRIC,
            label: str = "") -> dict[float, float]:
    """What a histogram counted between two scrapes."""
    a, b = buckets_of(before, metric, label), buckets_of(after, metric, label)
    return {bound: count - a.get(bound, 0.0) for bound, count in b.items()}


def _stages(before: str, after: str) -> dict[str, dict[str, float]]:
    """Per-batch time of each stage in the window: where an order's latency goes."""
    out = {}
    for stage in STAGES:
        w = _window(before, after, STAGE_METRIC, f'stage="{stage}"')
        if w.get(float("inf")):
            out[stage] = {"batches": w[float("inf")], "p50_ms": quantile(w, 0.5) * 1000,
                          "p99_ms": quantile(w, 0.99) * 1000}
    return out


async def _wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if b'"workers":2' in r.read():
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the engine did not become healthy")


async def _at_rates(rates: list[float], seconds: float) -> None:
    settings = bench_settings()
    pid = 990_000_010
    for rate in rates:
        await reset(settings, [pid])
        r = await measure(settings, pid, rate, seconds, free_port())
        if r.get("failed"):
            print(f"{rate:,.0f} orders/s: FAILED: {r['failed']}", flush=True)
            if "p50_ms" not in r:
                continue
        print(f"{rate:,.0f} orders/s: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, max <= {r['max_le_ms']:.0f} ms", flush=True)
        for stage, st in r["stages"].items():
            print(f"    {stage:<8} per batch: p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} ms"
                  f" ({st['batches']:,.0f} batches)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.latency RATE...`: the latency phase alone, at rates you choose."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("rates", nargs="+", type=float, help="orders per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="window per rate")
    args = parser.parse_args(argv)
    prepare(bench_settings())
    asyncio.run(_at_rates(args.rates, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
