"""`python -m bench.engineab`: two engine trees against each other, drains alternated.

A change to the workers moves their CPU per order by less than one drain moves from the
next on these shared cores; two `make bench` runs an hour apart cannot tell. Here the
same preloaded backlog is drained by variant A, then B, then B, A, A, B ... (one drain
each, the services emptied and idle before each), so a slow spell lands on both. A
variant is a set of environment overrides for its `seckill run`, e.g.
`PYTHONPATH=/tmp/old-checkout` (its code) or `SECKILL_BATCH_SIZE=500`.

    python -m bench.engineab --a PYTHONPATH=/tmp/old --b "" [--rounds 6] [--orders 60000]
    python -m bench.engineab --a "" --b "" --sales 1 --sales-b 1000   # many sales' cost
    python -m bench.engineab --profile /tmp/worker [--a ...]   # py-spy of one worker
    python -m bench.engineab --trace-b 0.01   # tracing's cost: B samples 1% (issue 25)

Prints each drain and B/A of the workers' CPU per order (the sum of every drain's
ticks over the sum of its orders), and writes bench/results/engineab-<time>.json.
`--trace-a R` / `--trace-b R`: that variant runs with `trace_sample` R, exporting to an
OTLP/HTTP receiver in this process, on a backlog whose share R carries the gate's trace
field (as bench/tracebench.py's drains). With `--profile PREFIX` variant A alone drains
once while py-spy samples one of its workers (`PREFIX.txt`: raw collapsed stacks;
`PREFIX.top.txt`: the functions' shares).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.testing.otlp import OtlpReceiver

from .abtest import variant
from .enginerun import Engine, drain
from .env import bench_settings, preload, prepare, reset
from .resultfiles import write_result

PID = 990_000_010


@contextlib.contextmanager
def environment(overrides: dict[str, str]) -> Iterator[None]:
    """os.environ with `overrides` while a child is started (it inherits ours)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def one_drain(settings: Any, overrides: dict[str, str], orders: int, workers: int,
                    sales: int, traced: float = 0.0, endpoint: str = "") -> dict[str, Any]:
    """One drain; `traced` > 0: with that trace_sample, exporting to `endpoint`."""
    pids = [PID + i for i in range(sales)]
    await reset(settings, pids, quiet_wait=15.0)
    await preload(settings, pids, orders, traced=traced)
    tracing = {"trace_sample": traced, "trace_endpoint": endpoint} if traced else {}
    with environment(overrides):
        return await drain(settings, pids, orders, workers, **tracing)


async def run(settings: Any, variants: list[dict[str, str]], rounds: int, orders: int,
              workers: int, sales: int, sales_b: int | None = None,
              traced: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """`sales_b` (default `sales`): variant B's open sales, to set 1,000 sales against 1
    in the same tree, alternated like any other pair. `traced`: each variant's
    `trace_sample` (0: as its environment says) and its backlog's sampled share."""
    runs: list[list[dict[str, Any]]] = [[], []]
    counts = (sales, sales if sales_b is None else sales_b)
    receiver = OtlpReceiver(keep=False).start() if any(traced) else None
    endpoint = receiver.endpoint if receiver is not None else ""
    try:
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                d = await one_drain(settings, variants[i], orders, workers, counts[i],
                                    traced[i], endpoint)
                runs[i].append(d)
                _say(f"round {r + 1}/{rounds} {'AB'[i]}", d)
    finally:
        if receiver is not None:
            receiver.stop()
    merged = [merge(rs) for rs in runs]
    return {"variants": variants, "rounds": rounds, "orders": orders, "workers": workers,
            "sales": counts[0], "sales_b": counts[1], "traced": list(traced),
            "a": merged[0], "b": merged[1],
            "b_over_a": merged[1]["cpu_us_per_order"] / merged[0]["cpu_us_per_order"],
            "runs": runs}


def _say(name: str, d: dict[str, Any]) -> None:
    print(f"  {name}: " + (f"FAILED {d['failed']}" if d.get("failed") else
                           f"{d['cpu_us_per_order']:5.1f} us/order {d['per_second']:8,.0f}/s "
                           f"workers {d['ticks']['workers']} ticks, "
                           f"peak RSS {d['peak_rss_mb']:.0f} MB"), flush=True)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' CPU per order over all good drains (ticks summed, orders summed), and
    each drain's own figure for the spread."""
    good = [r for r in runs if not r.get("failed")]
    ticks = sum(r["ticks"]["workers"] for r in good)
    orders = sum(r["processed"] for r in good)
    hz = good[0]["tick_hz"] if good else 100
    per = sorted(r["cpu_us_per_order"] for r in good)
    return {"cpu_us_per_order": ticks / hz / orders * 1e6 if orders else float("nan"),
            "each_us": per, "per_second": sorted(r["per_second"] for r in good),
            "peak_rss_mb": max((r["peak_rss_mb"] for r in good), default=0.0),
            "failed": len(runs) - len(good)}


async def profile(settings: Any, overrides: dict[str, str], prefix: Path, orders: int,
                  workers: int, seconds: float, rate: int, sales: int = 1) -> dict[str, Any]:
    """Drain once with py-spy sampling one worker from its first read for `seconds`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    pids = [PID + i for i in range(sales)]
    await reset(settings, pids, quiet_wait=15.0)
    await preload(settings, pids, orders)
    raw = prefix.with_suffix(".txt")
    started: list[subprocess.Popen[bytes]] = []
    real_start = Engine.__init__

    def start_spy(self: Engine, *args: Any, **kw: Any) -> None:
        real_start(self, *args, **kw)
        loop = asyncio.get_running_loop()
        loop.create_task(_attach(self, spy, raw, seconds, rate, started))

    Engine.__init__ = start_spy  # type: ignore[method-assign]
    try:
        with environment(overrides):
            result = await drain(settings, pids, orders, workers)
    finally:
        Engine.__init__ = real_start  # type: ignore[method-assign]
        for p in started:
            p.wait(30)
    top = top_functions(raw.read_text())
    (prefix.with_suffix(".top.txt")).write_text(format_top(top, result))
    return {"drain": result, "top": top}


async def _attach(engine: Engine, spy: str, raw: Path, seconds: float, rate: int,
                  started: list[subprocess.Popen[bytes]]) -> None:
    while len(engine.worker_pids()) < engine.workers:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # boot done; the drain is under way
    pid = engine.worker_pids()[0]
    if os.environ.get("ENGINEAB_PERF"):  # native: perf's view of the same worker
        started.append(subprocess.Popen(
            ["perf", "record", "-F", str(rate), "-p", str(pid), "-o",
             str(raw.with_suffix(".perf")), "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    started.append(subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate",
         str(rate), "--format", "raw", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def top_functions(collapsed: str, n: int = 30) -> dict[str, Any]:
    """Self and inclusive sample shares of each function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    return {"samples": total,
            "self": [(f, c / total) for f, c in own.most_common(n)] if total else [],
            "inclusive": [(f, c / total) for f, c in incl.most_common(n)] if total else []}


def _short(frame: str) -> str:
    """`func (path/to/module.py:line)` -> `func (module.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


def format_top(top: dict[str, Any], drain: dict[str, Any]) -> str:
    us = drain.get("cpu_us_per_order", 0.0)
    lines = [f"samples {top['samples']}; workers {us:.1f} us/order "
             f"({drain.get('per_second', 0):,.0f} orders/s)", "", "self:"]
    lines += [f"  {share:6.1%}  {share * us:5.2f} us  {f}" for f, share in top["self"]]
    lines += ["", "inclusive:"]
    lines += [f"  {share:6.1%}  {share * us:5.2f} us  {f}" for f, share in top["inclusive"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engineab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="", help="variant A's environment, K=V[,K=V]")
    p.add_argument("--b", default="", help="variant B's environment, K=V[,K=V]")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--orders", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sales", type=int, default=1)
    p.add_argument("--sales-b", type=int, default=None,
                   help="variant B's open sales (default --sales): e.g. --a and --b the "
                        "same tree, --sales 1 --sales-b 1000, for the cost of many sales")
    p.add_argument("--trace-a", type=float, default=0.0,
                   help="variant A's trace_sample, its backlog sampled alike")
    p.add_argument("--trace-b", type=float, default=0.0, help="the same for variant B")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy one worker of variant A instead: output prefix")
    p.add_argument("--profile-seconds", type=float, default=8.0)
    p.add_argument("--profile-rate", type=int, default=250)
    args = p.parse_args(argv)
    settings = bench_settings()
    prepare(settings)
    if args.profile:
        asyncio.run(profile(settings, variant(args.a), args.profile, args.orders,
                    args.workers, args.profile_seconds, args.profile_rate, args.sales))
        print(args.profile.with_suffix(".top.txt").read_text())
        return 0
    doc = asyncio.run(run(settings, [variant(args.a), variant(args.b)], args.rounds,
                          args.orders, args.workers, args.sales, args.sales_b,
                          (args.trace_a, args.trace_b)))
    print("| variant | environment | us/order (all drains) | each drain | orders/s |"
          "\n|---|---|---:|---|---|")
    for name in ("a", "b"):
        m = doc[name]
        env = doc["variants"][0 if name == "a" else 1] or "(none)"
        each = ", ".join(f"{v:.1f}" for v in m["each_us"])
        rates = ", ".join(f"{v:,.0f}" for v in m["per_second"])
        print(f"| {name.upper()} | {env} | {m['cpu_us_per_order']:.2f} | {each} | {rates} |")
    print(f"B/A workers' CPU per order: {doc['b_over_a']:.3f}")
    print(f"written: {write_result('engineab', doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
