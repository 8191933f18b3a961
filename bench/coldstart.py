"""`python -m bench.coldstart [--baseline DIR]`: new tokens at the start of a sale, two BFF workers.

At the start of a sale nearly every buyer's first purchase carries a token the
BFF has not seen. Two rows, each on a new `seckill bff` (JWT on, 2 workers,
so every cache starts empty) and a sale of its own:

- `everyone cold`: `--tokens` buyers each send one purchase;
- `pre-sale page loaded`: each buyer first loads a page with their token, all on
  one connection (so on one worker), then sends the purchase, spread over
  connections held by both workers, as the kernel spreads buyers.

Per row: the BFF workers' CPU per purchase over the purchases only (the page
loads apart), and the token verifications the BFF counted over them (its admin
/metrics). Each tree runs its own BFF (PYTHONPATH = that tree), so
`--baseline /path/to/main` gives the before in the same run. Requests are
written on keep-alive connections, PIPELINE at a time, by this process.
Written to bench/results/coldstart-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.ports import free_port
from engine.testing.processes import children

from .bff import verifications, wait_listening
from .enginerun import TICK, cpu_ticks, engine_env
from .resultfiles import write_result
from .tokens import WARM_PATH, Conn, Issuer, TokenFile, connections_per_worker

HERE = Path(__file__).resolve().parent.parent
SECKILL = str(Path(sys.executable).with_name("seckill"))
PREFIX = "bench-coldstart:"
PID = 990_300_000
WORKERS = 2
PIPELINE = 100
ROWS = ("everyone cold", "pre-sale page loaded")


async def _send(conn: Conn, requests: list[bytes]) -> dict[str, int]:
    """Write `requests` PIPELINE at a time; the count of each answer's status."""
    reader, writer = conn
    statuses: dict[str, int] = {}
    for i in range(0, len(requests), PIPELINE):
        batch = requests[i:i + PIPELINE]
        writer.write(b"".join(batch))
        for _ in batch:
            status = (await asyncio.wait_for(reader.readline(), 30)).split(b" ")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            code = status[1].decode() if len(status) > 1 else "?"
            statuses[code] = statuses.get(code, 0) + 1
    return statuses


def _requests(method: str, path: str, tokens: list[bytes]) -> list[bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n".encode()
    return [head + b"Authorization: Bearer " + t + b"\r\n\r\n" for t in tokens]


async def _row(tree: Path, settings: Settings, issuer: Issuer, tokens: TokenFile, pid: int,
               presale: bool) -> dict[str, Any]:
    port, admin = free_port(), free_port()
    env = engine_env(settings, bff_auth="jwt", bff_jwks=str(issuer.jwks), bff_admin_port=admin,
                     bff_ip_rate=0, bff_user_rate=0)
    env["PYTHONPATH"] = str(tree)
    with tempfile.NamedTemporaryFile(prefix="seckill-coldstart-", suffix=".log") as log:
        proc = subprocess.Popen([SECKILL, "bff", "--port", str(port), "--workers",
                                 str(WORKERS)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            await wait_listening(port, proc, log.name)
            for _ in range(300):
                if len(workers := children(proc.pid)) == WORKERS:
                    break
                await asyncio.sleep(0.1)
            held = await connections_per_worker(port, workers, 2)
            conns = [c for pid_conns in held.values() for c in pid_conns]
            lines = [token for _, token in tokens.lines()]
            page: dict[str, int] = {}
            if presale:  # every page load on the first worker's first connection
                page = await _send(conns[0], _requests("GET", WARM_PATH.format(pid=pid),
                                                       lines))
            before, cpu_before = await verifications(admin), sum(map(cpu_ticks, workers))
            started = time.perf_counter()
            buys = _requests("POST", f"/api/v1/seckill/{pid}", lines)
            parts = await asyncio.gather(*(_send(c, buys[i::len(conns)])
                                           for i, c in enumerate(conns)))
            seconds = time.perf_counter() - started
            cpu = (sum(map(cpu_ticks, workers)) - cpu_before) / TICK
            verified = await verifications(admin) - before
            for _, writer in conns:
                writer.close()
        finally:
            proc.terminate()
            proc.wait(30)
    statuses: dict[str, int] = {}
    for part in parts:
        for code, n in part.items():
            statuses[code] = statuses.get(code, 0) + n
    return {"purchases": len(lines), "statuses": statuses, "page_statuses": page,
            "seconds": seconds, "cpu_s": cpu, "cpu_us_per_purchase": cpu / len(lines) * 1e6,
            "verifications": verified}


async def measure(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings().replace(key_prefix=PREFIX)
    directory = Path(tempfile.mkdtemp(prefix="seckill-coldstart-"))
    issuer = Issuer(directory, issuer=settings.bff_jwt_issuer,
                    audience=settings.bff_jwt_audience)
    tokens = issuer.mint("buyers", 10**12, args.tokens, max(1, os.cpu_count() or 1))
    redis = Redis.from_url(settings.redis_url)
    gate = Gate(redis, Keys(PREFIX))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {row: [] for row in ROWS} for name in trees}
    pids = iter(range(PID, PID + 10_000))
    try:  # rounds outermost: a slow spell of the shared machine lands on every row
        for n in range(args.rounds):
            for name, tree in trees.items():
                for row in ROWS:
                    pid = next(pids)
                    await gate.open_sale(pid, args.tokens, clear_buyers=True)
                    print(f"round {n + 1}, {name}: {row} ...", flush=True)
                    runs[name][row].append(await _row(tree, settings, issuer, tokens, pid,
                                                      row != ROWS[0]))
    finally:
        async for key in redis.scan_iter(match=PREFIX + "*", count=1000):
            await redis.delete(key)
        await redis.aclose()
    return {name: {row: {**min(r, key=lambda x: x["cpu_us_per_purchase"]),
                         "cpu_us_per_purchase_rounds": [x["cpu_us_per_purchase"] for x in r]}
                   for row, r in rows.items()} for name, rows in runs.items()}


def table(doc: dict[str, Any]) -> str:
    lines = ["| tree | row | purchases | BFF CPU per purchase (us, least) | every round |"
             " token verifications | statuses |", "|---|---|---:|---:|---|---:|---|"]
    for name, rows in doc["trees"].items():
        for row, r in rows.items():
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
            lines.append(f"| {name} | {row} | {r['purchases']:,} | "
                         f"{r['cpu_us_per_purchase']:.0f} | "
                         + ", ".join(f"{x:.0f}" for x in r["cpu_us_per_purchase_rounds"])
                         + f" | {r['verifications']:,.0f} | "
                         f"{codes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout to measure the same way")
    p.add_argument("--tokens", type=int, default=4000, help="buyers, one purchase each")
    p.add_argument("--rounds", type=int, default=1, help="BFFs per row; the least CPU kept")
    args = p.parse_args(argv)
    trees = {"this tree": HERE}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    doc: dict[str, Any] = {"tokens": args.tokens, "workers": WORKERS, "rounds": args.rounds,
                           "paths": {k: str(v) for k, v in trees.items()}}
    doc["trees"] = asyncio.run(measure(trees, args))
    text = table(doc)
    path = write_result("coldstart", doc, text)
    print(text)
    print(f"written: {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
