"""`python -m bench [--quick] [--long]`: the whole suite in one run, ratios side by side.

Every figure is measured in this run on this machine; the targets are
checked as ratios against baselines of the same run, never as absolute
numbers copied from elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from . import bff, ceilings, latency, naive
from .enginerun import drain, free_port
from .env import VHOST, bench_settings, machine, preload, prepare, reset
from .report import markdown, plots, targets

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {  # quick, full, long
    "ceiling": (20_000, 100_000, 100_000),
    "naive": (1_000, 3_000, 3_000),
    "engine": (30_000, 200_000, 200_000),
    "latency_s": (6.0, 20.0, 20.0),
    "scale": (20_000, 100_000, 100_000),
    "soak": (0, 0, 2_000_000),
    "bff_s": (4.0, 10.0, 10.0),
}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def progress(label: str) -> Any:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2 or done >= total:
            last[0] = now
            print(f"    {label}: {done:,}/{total:,}", flush=True)
    return report


async def run_suite(size: int) -> dict[str, Any]:
    s = bench_settings()
    results: dict[str, Any] = {}
    pid = [990_000_010]

    say("ceilings: Redis XREADGROUP+XACK, publish with confirms, COPY")
    await reset(s, [])
    n = SIZES["ceiling"][size]
    results["ceiling_redis"] = await ceilings.redis_drain(s, n)
    results["ceiling_publish_plain"] = await ceilings.publish_plain(s, n)
    results["ceiling_publish_batched"] = await ceilings.publish_batched(s, n)
    results["ceiling_copy"] = await ceilings.copy_rate(s, n)
    results["queue_type"] = ceilings.queue_type(VHOST)
    results["queue_types"] = await ceilings.publish_by_queue_type(s, n)

    say("naive baseline: the seed's loop, one order at a time")
    await reset(s, [990_000_002])
    results["naive"] = await naive.run_naive(s, SIZES["naive"][size])

    n = SIZES["engine"][size]
    for workers in (1, 2):
        say(f"engine with {workers} worker(s): draining {n:,} orders")
        await reset(s, pid)
        await preload(s, pid, n, progress("preloaded"))
        results[f"engine_{workers}w"] = await drain(s, pid, n, workers,
                                                    progress(f"{workers}w acked"))

    capacity = results["engine_2w"]["per_second"]
    for share in (0.5, 0.9):
        say(f"latency at {share:.0%} of capacity ({capacity * share:,.0f} orders/s)")
        await reset(s, pid)
        results[f"latency_{int(share * 100)}"] = await latency.measure(
            s, pid[0], capacity * share, SIZES["latency_s"][size], free_port())

    n = SIZES["scale"][size]
    for sales in (1, 100, 1000):
        say(f"scale: {n:,} orders over {sales} open sales, 2 workers")
        pids = [991_000_000 + i for i in range(sales)]
        await reset(s, pids)
        await preload(s, pids, n, progress("preloaded"))
        results[f"scale_{sales}"] = await drain(s, pids, n, 2, progress(f"{sales} sales"))

    say("HTTP gate vs the gate called directly, 64 connections")
    await reset(s, [])
    results["bff"] = await bff.measure_bff_vs_gate(s, seconds=SIZES["bff_s"][size],
                                                   connections=64)

    if SIZES["soak"][size]:
        n = SIZES["soak"][size]
        say(f"soak: {n:,} orders through 2 workers")
        await reset(s, pid)
        await preload(s, pid, n, progress("preloaded"))
        results["soak"] = await drain(s, pid, n, 2, progress("soak acked"), timeout=3600)
    await reset(s, [])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (under 3 minutes)")
    parser.add_argument("--long", action="store_true", help="include the 2,000,000-order soak")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    args = parser.parse_args(argv)
    size = 0 if args.quick else (2 if args.long else 1)
    s = bench_settings()
    say("preparing the bench database and vhost")
    prepare(s)
    started = dt.datetime.now(dt.UTC)
    results = asyncio.run(run_suite(size))
    doc = {"started": started.isoformat(), "mode": ["quick", "full", "long"][size],
           "machine": machine(s).as_dict(), "results": results,
           "targets": targets(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y%m%d-%H%M%S}-{socket.gethostname()}"
    (args.out / f"{stem}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    table = markdown(doc)
    (args.out / f"{stem}.md").write_text(table)
    for path in plots(doc, args.out, stem):
        say(f"plot: {path}")
    print()
    print(table)
    say(f"results: {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
