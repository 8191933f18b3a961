"""Latency under an open-loop load: orders arrive on a schedule, not when we are ready.

A closed loop (send, wait, send) hides queueing; here a producer adds orders
at a fixed rate whatever the engine does, and the engine's own histogram of
"entry creation -> acknowledgement" is read before and after the window, so
warm-up is not part of the figures.

Beside it, in the same phase and at the same rate, the broker alone
(`broker_probe`): the same INSTANCE_CREATED events, persistent and mandatory,
through the same exchange and routing key into the same queue (the topology's
own, of the vhost's queue type), published open loop in the same 10 ms ticks,
each tick's events as one framed batch with confirms (as the engine's publisher
sends them), so its p99 from a tick to its events' confirms is what RabbitMQ
itself takes at that rate on this machine at this moment. The target is our
p99 against that one (bench/verdicts.py).

That probe runs before the engine, on a machine that does nothing else. With
`--beside F` a second probe publishes at F times the rate into the same queue
while the engine runs its window: RabbitMQ's confirm latency under the load the
whole pipeline puts on the machine, which is what bounds an order's publish stage.
`--set NAME=VALUE,...` changes the engine's settings (e.g. max_inflight_batches=8).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from typing import Any

from redis.asyncio import Redis

from engine.amqp.publisher import CONFIRMED, ConfirmPublisher
from engine.amqp.topology import RK_CREATED
from engine.config import Settings
from engine.keys import GROUP, Keys
from engine.pipeline.events import INSTANCE_CREATED, TYPE_NAMES, build_events, product_prefix
from engine.pipeline.ids import EPOCH_MS, compose, wall_ms
from engine.pipeline.orders import Order
from engine.products import gpu_product
from engine.testing.ports import free_port

from .enginerun import Engine, acked
from .env import bench_settings, prepare, purge_queues, quiesce, reset

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


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank), NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


async def broker_probe(settings: Settings, pid: int, rate: float, seconds: float,
                       warm_up: float = 1.0) -> dict[str, Any]:
    """RabbitMQ's own confirm latency at `rate`, open loop (see the module docstring):
    per event, from the start of its tick to the confirm of its tick's batch."""
    publisher = ConfirmPublisher(settings, RK_CREATED, TYPE_NAMES[INSTANCE_CREATED])
    await publisher.connect()
    prefixes = {pid: product_prefix(gpu_product(pid))}
    first_id = compose(wall_ms() - EPOCH_MS, 1023, 0)  # node 1023: no worker's IDs
    latencies: list[float] = []
    outcomes: dict[str, int] = {}

    async def tick(first: int, count: int, counted: bool) -> None:
        t0 = time.perf_counter()
        ms = int(time.time() * 1000)
        orders = [Order(pid, i, f"{ms}-{i}", ms // 1000, "lat", i, b"", first_id + i)
                  for i in range(first, first + count)]
        bodies, ids = build_events(orders, prefixes, ms // 1000)
        got = await publisher.publish_bodies(bodies, ids, settings.publish_timeout)
        took = (time.perf_counter() - t0) * 1000
        if counted:
            latencies.extend([took] * got.count(CONFIRMED))
            for outcome in got:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    ticks: set[asyncio.Task] = set()
    sent = 0
    start = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - start) < warm_up + seconds:
            due = int(rate * elapsed) - sent
            if due > 0:
                task = asyncio.create_task(tick(sent + 1, due, elapsed >= warm_up))
                ticks.add(task)
                task.add_done_callback(ticks.discard)
                sent += due
            await asyncio.sleep(0.01)
        if ticks:
            await asyncio.gather(*ticks)
    finally:
        await publisher.close()
    return {"rate": rate, "seconds": seconds, "events": sum(outcomes.values()),
            "outcomes": outcomes, "p50_ms": percentile(latencies, 0.50),
            "p95_ms": percentile(latencies, 0.95), "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies, default=float("nan"))}


async def measure(settings: Settings, pid: int, rate: float, seconds: float,
                  port: int, drain_timeout: float = 60.0, probe: bool = True,
                  beside: float = 0.0, engine: Settings | None = None) -> dict[str, Any]:
    """Percentiles of the orders produced at `rate` for `seconds`, and (`probe`) the
    broker's own beside them, measured first. If the orders are not all acknowledged
    within `drain_timeout` after the window, the run is failed (its percentiles would
    leave out the slowest orders), not cut short in silence."""
    broker = None
    if probe:
        broker = await broker_probe(settings, pid, rate, seconds)
        await purge_queues(settings)
        await quiesce(settings, longest=15.0)
    out = await _measure_engine(engine or settings, pid, rate, seconds, port, drain_timeout,
                                beside)
    if broker is not None:
        out.update(broker=broker, broker_p99_ms=broker["p99_ms"])
    return out


async def _measure_engine(settings: Settings, pid: int, rate: float, seconds: float,
                          port: int, drain_timeout: float, beside: float = 0.0
                          ) -> dict[str, Any]:
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
        probing = asyncio.ensure_future(broker_probe(settings, pid, rate * beside, seconds)) \
            if beside else None
        sent = await produce(settings, pid, rate, seconds, first=warm + 1)
        probed = await probing if probing is not None else None
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
            "count": window.get(float("inf"), 0.0), "stages": _stages(before, after),
            **({"broker_beside": probed} if probed is not None else {})}


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


async def _at_rates(rates: list[float], seconds: float, beside: float = 0.0,
                    changes: dict[str, Any] | None = None) -> None:
    settings = bench_settings()
    pid = 990_000_010
    for rate in rates:
        await reset(settings, [pid])
        r = await measure(settings, pid, rate, seconds, free_port(), beside=beside,
                          engine=settings.replace(**changes) if changes else None)
        if r.get("failed"):
            print(f"{rate:,.0f} orders/s: FAILED: {r['failed']}", flush=True)
            if "p50_ms" not in r:
                continue
        print(f"{rate:,.0f} orders/s: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, max <= {r['max_le_ms']:.0f} ms", flush=True)
        b = r["broker"]
        print(f"    broker alone, same events and rate: p50 {b['p50_ms']:.1f} ms, "
              f"p99 {b['p99_ms']:.1f} ms, max {b['max_ms']:.0f} ms; ours / broker p99 "
              f"{r['p99_ms'] / b['p99_ms']:.2f}", flush=True)
        if "broker_beside" in r:
            b = r["broker_beside"]
            print(f"    broker beside the engine, {b['rate']:,.0f}/s into the same queue: p50 "
                  f"{b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, max {b['max_ms']:.0f} ms; "
                  f"ours / that p99 {r['p99_ms'] / b['p99_ms']:.2f}", flush=True)
        for stage, st in r["stages"].items():
            print(f"    {stage:<8} per batch: p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} ms"
                  f" ({st['batches']:,.0f} batches)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.latency RATE...`: the latency phase alone, at rates you choose."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("rates", nargs="+", type=float, help="orders per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="window per rate")
    parser.add_argument("--beside", type=float, default=0.0,
                        help="a probe at this fraction of the rate beside the engine's window")
    parser.add_argument("--set", default="", help="engine settings, NAME=VALUE[,NAME=VALUE]")
    args = parser.parse_args(argv)
    settings = bench_settings()
    prepare(settings)
    asyncio.run(_at_rates(args.rates, args.seconds, args.beside, _changes(settings, args.set)))
    return 0


def _changes(settings: Settings, text: str) -> dict[str, Any]:
    """`NAME=VALUE,...` as settings changes, each VALUE of its setting's type."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name] = type(getattr(settings, name))(value)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
