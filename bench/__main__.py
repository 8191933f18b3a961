"""`python -m bench [--quick] [--long]`: the whole suite in one run, ratios side by side.

Every figure is measured in this run on this machine; the targets are
checked as ratios against baselines of the same run, never as absolute
numbers copied from elsewhere. A full or long run repeats every phase a
target reads in three rounds (each phase alternating with its baseline) and
judges a target met only when all its runs are on the right side
(bench/verdicts.py); a quick run is one round, printed "not judged (quick)".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from engine.testing.clusters import LocalRedisCluster
from engine.testing.ports import free_port

from . import bff, ceilings, cluster, latency, naive, tracebench
from .enginerun import drain
from .env import VHOST, bench_settings, machine, preload, prepare, reset
from .report import markdown, plots, targets

RESULTS = Path(__file__).resolve().parent / "results"

# Sizes of one run of each phase; every phase a target reads runs once per round,
# ROUNDS times, so each target sees its phase alternate with its baseline. The full
# sizes are smaller than a single-shot suite would use (engine 120,000 orders, not
# 200,000) to keep three rounds near 15 minutes on 2 cores; each is still long enough
# for the CPU clock (see verdicts.MIN_TICKS; the tables print the ticks).
SIZES = {  # quick, full, long
    "ceiling": (20_000, 60_000, 60_000),
    "ceiling_plain": (3_000, 10_000, 10_000),  # aiormq's basic_publish: ~3,000/s
    "naive": (500, 1_500, 1_500),
    "engine": (30_000, 120_000, 120_000),
    "latency_s": (5.0, 12.0, 12.0),
    "scale": (15_000, 90_000, 90_000),  # at 17 us an order, 60,000 gave 99 ticks (< 100)
    "soak": (0, 0, 1_000_000),  # per round: three 1,000,000-order soaks
    # per server, in bff_slices windows that alternate direct gate, floor and BFF
    "bff_s": (2.0, 12.0, 12.0),
    "bff_slices": (2, 6, 6),
    "bff_cold_s": (2.0, 3.0, 3.0),  # every token new to the BFF: the cold cost apart
    # buyers with a minted token, once per run (about 0.3 ms each on 2 cores): the window
    # buys 8 products with each warm token (bench/bff.py), the cold one 1 per token
    "bff_tokens": (10_000, 20_000, 20_000),
    "bff_cold_tokens": (12_000, 20_000, 20_000),
    "cluster": (10_000, 90_000, 90_000),  # per run of each cluster phase (bench/cluster.py)
    # tracing (bench/tracebench.py): seven side-by-side drains per round, and each traced
    # BFF's seconds per round in trace_windows windows beside the untraced one's: some
    # 150 s a round in all
    "trace_engine": (15_000, 90_000, 90_000),  # a side some 45,000 orders, 70 ticks
    "trace_http_s": (1.0, 6.0, 6.0),
    "trace_windows": (1, 3, 3),
}
ROUNDS = (1, 3, 3)  # quick, full, long; a quick run is never judged
MODES = ("quick", "full", "long")


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


class Suite:
    """The phases of one run of the suite, each run recorded under its key.

    A phase that raises (an engine that would not start, a service that went
    away) becomes a failed run with the reason: the table shows it and no target
    counts it, and the rest of the suite still runs.
    """

    def __init__(self, size: int, only: str | None = None) -> None:
        self.size = size
        self.only = only  # "trace": the tracing phases alone
        self.settings = bench_settings()
        self.results: dict[str, Any] = {}
        self.pid = [990_000_010]
        self.cluster: LocalRedisCluster | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="seckill-bench-")
        self._http: bff.HttpBench | None = None
        self._trace: tracebench.TraceBench | None = None

    async def reset(self, pids: list[int]) -> None:
        """Empty everything and wait for idle services: at most 10 s in a quick run (a
        shared machine may never be idle), 30 s otherwise."""
        await reset(self.settings, pids, quiet_wait=(10.0, 30.0, 30.0)[self.size])

    def n(self, key: str) -> Any:
        return SIZES[key][self.size]

    async def phase(self, key: str, label: str, run: Callable[[], Awaitable[dict[str, Any]]]
                    ) -> dict[str, Any]:
        say(label)
        try:
            result = await run()
        except Exception as exc:  # the phase failed: record it, go on
            traceback.print_exc()
            result = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
        self.results.setdefault(key, {"runs": []})["runs"].append(result)
        if result.get("failed"):
            say(f"    FAILED: {result['failed']}")
        elif "per_second" in result:
            say(f"    {result['per_second']:,.0f} orders/s")
        return result

    async def drained(self, pids: list[int], total: int, workers: int,
                      label: str) -> dict[str, Any]:
        await self.reset(pids)
        await preload(self.settings, pids, total, progress("preloaded"))
        return await drain(self.settings, pids, total, workers, progress(label))

    async def round(self, number: int, rounds: int) -> None:
        s, tag = self.settings, f"[{number + 1}/{rounds}]"
        await self.reset([])
        if self.only == "trace":
            await self.trace_phases(tag, number)
            return
        n = self.n("ceiling")
        await self.phase("ceiling_redis", f"{tag} ceiling: Redis XREADGROUP+XACK",
                         lambda: ceilings.redis_drain(s, n))
        await self.phase("ceiling_publish_plain", f"{tag} ceiling: aiormq publish, confirms",
                         lambda: ceilings.publish_plain(s, self.n("ceiling_plain")))
        await self.phase("ceiling_publish_batched", f"{tag} ceiling: engine publisher alone",
                         lambda: ceilings.publish_batched(s, n))
        await self.phase("ceiling_copy", f"{tag} ceiling: COPY",
                         lambda: ceilings.copy_rate(s, n))
        if number == 0:
            self.results["queue_type"] = ceilings.queue_type(VHOST)
            await self.phase("queue_types", f"{tag} publish: quorum vs classic queue",
                             lambda: ceilings.publish_by_queue_type(s, n))

        async def naive_run() -> dict[str, Any]:
            await self.reset([990_000_002])
            return await naive.run_naive(s, self.n("naive"))
        await self.phase("naive", f"{tag} naive baseline: the seed's loop, one order at a time",
                         naive_run)

        n = self.n("engine")
        for workers in (1, 2):
            await self.phase(f"engine_{workers}w",
                             f"{tag} engine with {workers} worker(s): {n:,} orders",
                             lambda w=workers: self.drained(self.pid, n, w, f"{w}w acked"))

        capacity = self._capacity()
        for share in (0.5, 0.9):
            async def latency_run(share: float = share) -> dict[str, Any]:
                if not capacity:
                    return {"failed": "no engine capacity measured to load against"}
                await self.reset(self.pid)
                return await latency.measure(s, self.pid[0], capacity * share,
                                             self.n("latency_s"), free_port())
            await self.phase(f"latency_{int(share * 100)}",
                             f"{tag} latency at {share:.0%} of capacity "
                             f"({capacity * share:,.0f} orders/s)", latency_run)

        n = self.n("scale")
        for sales in (1, 100, 1000) if number == 0 else (1, 1000):
            pids = [991_000_000 + i for i in range(sales)]
            await self.phase(f"scale_{sales}",
                             f"{tag} scale: {n:,} orders over {sales} open sales, 2 workers",
                             lambda p=pids, k=sales: self.drained(p, n, 2, f"{k} sales"))

        async def bff_run() -> dict[str, Any]:
            await self.reset([])
            return await self.http().measure(seconds=self.n("bff_s"),
                                             cold_seconds=self.n("bff_cold_s"), connections=64)
        await self.phase("bff", f"{tag} HTTP gate (JWT on) vs its floor and the gate called "
                         "directly, 64 connections", bff_run)

        await self.trace_phases(tag, number)
        await self.cluster_phases(tag)

        if n := self.n("soak"):
            await self.phase("soak", f"{tag} soak: {n:,} orders through 2 workers",
                             lambda: self.drained(self.pid, n, 2, "soak acked"))

    def http(self) -> bff.HttpBench:
        """The HTTP phase's tokens, minted at its first round and kept for the others."""
        if self._http is None:
            say(f"    minting {self.n('bff_tokens') + self.n('bff_cold_tokens'):,} tokens")
            self._http = bff.HttpBench(self.settings, Path(self.tmp.name),
                                       tokens=self.n("bff_tokens"),
                                       cold_tokens=self.n("bff_cold_tokens"),
                                       slices=self.n("bff_slices"))
        return self._http

    async def trace_phases(self, tag: str, number: int) -> None:
        """Tracing's cost (issue 25): engine drains and BFF windows at trace_sample 0,
        0.01 and 1 and of the build before tracing, taking turns (bench/tracebench.py)."""
        if self._trace is None:
            self._trace = tracebench.TraceBench(self.settings)
        trace, n = self._trace, self.n("trace_engine")
        await self.phase("trace_engine", f"{tag} tracing: engine drains of {n:,} orders, "
                         "untraced build and trace_sample 0 / 0.01 / 1",
                         lambda: trace.engine(number, n, self.reset, say))

        async def http_run() -> dict[str, Any]:
            await self.reset([])
            return await trace.http(self.http(), number, self.n("trace_http_s"),
                                    self.n("trace_windows"), say=say)
        await self.phase("trace_http", f"{tag} tracing: BFF windows, untraced build and "
                         "trace_sample 0 / 0.01 / 1", http_run)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
        if self._trace is not None:
            self._trace.close()

    async def cluster_phases(self, tag: str) -> None:
        """The engine on a local 3-master Redis Cluster (with replicas; started once per
        suite): 100 sales against the single Redis, and 1 sale against 1,000 sales."""
        if self.cluster is None:
            self.cluster = LocalRedisCluster().start()
        s, n, url = self.settings, self.n("cluster"), self.cluster.url
        for key, redis_url, sales in (("cluster_single_100", s.redis_url, 100),
                                      ("cluster_100", url, 100), ("cluster_scale_1", url, 1),
                                      ("cluster_scale_1000", url, 1000)):
            where = "Redis Cluster" if redis_url == url else "single Redis"
            await self.phase(key, f"{tag} {where}: {n:,} orders over {sales} sales, 2 workers",
                             lambda u=redis_url, k=sales, key=key: cluster.suite_run(
                                 s, u, k, n // k, key))

    def _capacity(self) -> float:
        """This round's 2-worker throughput, or the last one measured if it failed."""
        for run in reversed(self.results.get("engine_2w", {}).get("runs", [])):
            if not run.get("failed"):
                return float(run["per_second"])
        return 0.0


async def run_suite(size: int, rounds: int, only: str | None = None) -> dict[str, Any]:
    suite = Suite(size, only)
    try:
        for number in range(rounds):
            await suite.round(number, rounds)
    finally:
        suite.close()
    await reset(suite.settings, [])
    suite.tmp.cleanup()
    return suite.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one round, not judged (under 4 minutes)")
    parser.add_argument("--long", action="store_true",
                        help="include a 1,000,000-order soak in each round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the repeated phases (default: quick 1, full and long 3; "
                             "fewer than 3 leaves every target not met)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    parser.add_argument("--only", choices=("trace",), default=None,
                        help="run only these phases (trace: tracing's cost, issue 25)")
    args = parser.parse_args(argv)
    size = 0 if args.quick else (2 if args.long else 1)
    rounds = args.rounds or ROUNDS[size]
    s = bench_settings()
    say("preparing the bench database and vhost")
    prepare(s)
    started = dt.datetime.now(dt.UTC)
    results = asyncio.run(run_suite(size, rounds, args.only))
    doc = {"started": started.isoformat(), "mode": MODES[size], "rounds": rounds,
           "seconds": (dt.datetime.now(dt.UTC) - started).total_seconds(),
           "machine": machine(s).as_dict(), "results": results}
    doc["targets"] = targets(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y%m%d-%H%M%S}-{socket.gethostname()}" + (
        f"-{args.only}" if args.only else "")
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
