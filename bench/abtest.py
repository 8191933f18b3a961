"""`python -m bench.abtest`: two BFFs against each other, windows alternated, same load.

A change to the BFF moves its CPU per purchase by a few percent, less than one window
on these shared cores moves from the next; two rounds of `python -m bench.bff` a few
minutes apart cannot tell the difference. Here both variants run at once (JWT on,
tokens verified once, as in the suite's HTTP phase) and take turns: A, B, B, A, A,
B, ... one window each, every window new purchases, so a slow spell lands on both.
A variant is a set of environment overrides for its `seckill bff`, e.g.
`PYTHONPATH=/path/to/another/checkout` (its code) or `SECKILL_BFF_MAX_INFLIGHT=64`.

    python -m bench.abtest --a PYTHONPATH=/tmp/old --b "" [--rounds 6] [--seconds 2]

Prints each window and B/A of the CPU per accepted purchase over all windows (an A/A
run, `--a "" --b ""`, shows the noise: within 3% here), and writes
bench/results/abtest-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.testing.processes import children

from .bff import BFF_PIDS, WARMUP_PID, HttpBench, merge_windows, open_sales
from .env import bench_settings, prepare, reset
from .httpload import Load, buy_path, load_window, wait_listening
from .resultfiles import write_result
from .tokens import warm

CONNECTIONS = 64


def variant(text: str) -> dict[str, str]:
    """"K=V,K2=V2" as a dict ("" = no override)."""
    return dict(part.split("=", 1) for part in text.split(",") if part)


async def run(settings: Any, variants: list[dict[str, str]], rounds: int, seconds: float,
              tokens: int) -> dict[str, Any]:
    await reset(settings, [], quiet_wait=10.0)
    with tempfile.TemporaryDirectory(prefix="seckill-abtest-") as tmp:
        bench = HttpBench(settings, Path(tmp), tokens=tokens, cold_tokens=1)
        products = BFF_PIDS[:len(BFF_PIDS) // (2 * rounds) * (2 * rounds)]
        per_window = len(products) // (2 * rounds)
        await open_sales(settings, [*products, WARMUP_PID])
        servers = []
        for overrides in variants:
            server, port, _ = bench.start_bff(overrides)
            servers.append((server.proc, port, server.log_path))
        windows: list[list[dict[str, Any]]] = [[], []]
        try:
            for proc, port, log in servers:
                await wait_listening(port, proc, str(log))
                await warm(port, children(proc.pid), bench.warm_tokens, WARMUP_PID)
                await load_window(proc, port, 1.0, CONNECTIONS, bench.warmup)
            used = 0
            for r in range(rounds):
                for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                    proc, port, _ = servers[i]
                    load = Load(tuple(buy_path(p) for p in
                                      products[used:used + per_window]), bench.warm_tokens)
                    used += per_window
                    w = await load_window(proc, port, seconds, CONNECTIONS, load)
                    windows[i].append(w)
                    print(f"  round {r + 1}/{rounds} {'AB'[i]}: "
                          f"{w['cpu_us_per_accepted']:6.1f} us/accepted "
                          f"{w['accepted_per_second']:8,.0f}/s p99 {w['p99_ms']:.1f} ms",
                          flush=True)
        finally:
            for proc, _, _ in servers:
                proc.send_signal(signal.SIGTERM)
            for proc, _, log in servers:
                proc.wait(30)
                log.unlink(missing_ok=True)
    merged = [merge_windows(w) for w in windows]
    return {"variants": variants, "rounds": rounds, "seconds": seconds, "a": merged[0],
            "b": merged[1],
            "b_over_a": merged[1]["cpu_us_per_accepted"] / merged[0]["cpu_us_per_accepted"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="", help="variant A's environment, K=V[,K=V]")
    p.add_argument("--b", default="", help="variant B's environment, K=V[,K=V]")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--tokens", type=int, default=20_000)
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= len(BFF_PIDS) // 4:  # (each window buys 2 products at least)
        p.error(f"--rounds: 1 to {len(BFF_PIDS) // 4}")
    settings = bench_settings()
    prepare(settings)
    doc = asyncio.run(run(settings, [variant(args.a), variant(args.b)], args.rounds,
                          args.seconds, args.tokens))
    print("| variant | environment | us/accepted | accepted/s | p99 ms |\n|---|---|---:|---:|---:|")
    for name in ("a", "b"):
        m = doc[name]
        env = doc["variants"][0 if name == "a" else 1] or "(none)"
        print(f"| {name.upper()} | {env} | {m['cpu_us_per_accepted']:.1f} | "
              f"{m['accepted_per_second']:,.0f} | {m['p99_ms']:.1f} |")
    print(f"B/A CPU per accepted purchase: {doc['b_over_a']:.3f}")
    path = write_result("abtest", doc)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
