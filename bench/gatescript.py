"""`python -m bench.gatescript [--quick]`: Redis's CPU per accepted purchase, ours and a peer's.

Every accepted attempt at the start of a sale runs the gate script on the one Redis
master that holds the product, so the script's own cost bounds the first second of a
sale. This measures it beside the closest open peer's script, in the same run:

- `peer`: hmdp's seckill.lua, written from its published description: the keys are
  built inside the script from the voucher ID; GET stock, SISMEMBER buyers,
  INCRBY -1, SADD, XADD to one orders stream; no window, no limits, no type guards;
- `ours`: engine/lua/seckill.lua called as the BFF's gate calls it: the keys and
  arguments of `Gate.attempt_call` (sale window, per-user limiter on with the settings'
  defaults, the client address's limiter key), on a sale opened by `Gate.open_sale`
  with a window that is open;
- `baseline` (with `--baseline FILE`): another version of our script, called the same
  way, e.g. `git show main:engine/lua/seckill.lua > /tmp/seckill-main.lua` (its keys and
  arguments must be laid out as today's; to compare with an older layout, run that
  version's own bench/gatescript.py from its checkout in the same session).

Each is driven by redis-benchmark (pipeline 16) against a private redis-server this
module starts on a free port, with a stock larger than the calls so that every call
is accepted, and a new user every call (redis-benchmark's `__rand_int__` over 2**31
values: a handful of repeats in 100,000 calls; each placeholder is drawn on its own,
so a call's limiter key names another random user than its user ID, which costs the
same). The figure is the redis-server process's user + system CPU (/proc/<pid>/stat)
over the calls, divided by the calls accepted (the stock taken). Within each round the
contestants take turns in short slices (the order reversed every other round), so a
change in a shared machine's load falls on all of them alike; read the ratio
ours / peer of each round. Written to bench/results/gatescript-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis

from engine.config import Settings
from engine.connections import connect_redis
from engine.gate.redis_gate import Gate, Limits, Window
from engine.keys import Keys
from engine.resources import lua_script
from engine.testing.nodes import RedisNode

from .resultfiles import write_result

TICK = os.sysconf("SC_CLK_TCK")
PIPELINE = 16
CLIENTS = 8
RANDOM_RANGE = 2**31 - 1  # redis-benchmark's -r is an int
RAND = "__rand_int__"
PID = 990_000_950
SIZES = {"quick": (40_000, 1), "full": (300_000, 3)}  # calls per contestant and round, rounds
SLICES = 10  # turns per contestant and round

# hmdp's script (its keys derived from the voucher; the order ID made by the caller)
PEER_SCRIPT = """\
local voucherId = ARGV[1]
local userId = ARGV[2]
local orderId = ARGV[3]
local stockKey = 'seckill:stock:' .. voucherId
local orderKey = 'seckill:order:' .. voucherId
if (tonumber(redis.call('get', stockKey)) <= 0) then
  return 1
end
if (redis.call('sismember', orderKey, userId) == 1) then
  return 2
end
redis.call('incrby', stockKey, -1)
redis.call('sadd', orderKey, userId)
redis.call('xadd', 'stream.orders', '*', 'userId', userId, 'voucherId', voucherId,
           'id', orderId)
return 0
"""


@dataclass(frozen=True)
class Contestant:
    """A script, how a sale is opened for it, and the command redis-benchmark repeats."""

    name: str
    source: str
    pid: int = PID  # the product (ours) or the voucher (the peer's): one per contestant

    async def open(self, redis: Any, stock: int) -> tuple[list[str], str]:
        """Open a sale of `stock` units: (the EVALSHA's keys and arguments after the
        SHA, the stock key)."""
        if self.name == "peer":
            stock_key = f"seckill:stock:{self.pid}"
            await redis.set(stock_key, stock)
            return ["0", str(self.pid), RAND, RAND], stock_key
        settings = Settings()
        limits = Limits(settings.bff_user_rate, settings.bff_user_burst,
                        settings.bff_ip_rate, settings.bff_ip_burst)
        k, pid = Keys(), self.pid
        gate = Gate(redis, k, limits=limits)
        now_ms = int(time.time() * 1000)
        await gate.open_sale(pid, stock, window=Window(now_ms - 60_000, now_ms + 86_400_000))
        sentinel = 987_654_321_012  # a user ID, replaced by the placeholder
        keys, args = gate.attempt_call(pid, sentinel, ip="127.0.0.1")
        keys = [key.replace(str(sentinel), RAND) for key in keys]
        args = [RAND if arg == sentinel else str(arg) for arg in args]
        return [str(len(keys)), *keys, *args], k.stock(pid)


def cpu_ticks(pid: int) -> int:
    """user + system clock ticks of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def redis_benchmark() -> str:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark not found: `make bench-tools` or "
                         "apt-get install redis-tools")
    return exe


async def _open(url: str, contestants: list[Contestant], stock: int
                ) -> dict[str, tuple[list[str], str]]:
    """A flushed Redis with every contestant's sale open: {name: (command, stock key)}."""
    redis = await connect_redis(Settings().replace(redis_url=url))
    try:
        await redis.flushall()
        opened = {}
        for who in contestants:
            command, stock_key = await who.open(redis, stock)
            sha = await redis.script_load(who.source)
            opened[who.name] = (["EVALSHA", sha, *command], stock_key)
        return opened
    finally:
        await redis.aclose()


def bench_calls(node: RedisNode, command: list[str], calls: int) -> tuple[int, float]:
    """`calls` calls of `command` by redis-benchmark (pipelined, a new random user each):
    the server's CPU ticks and the seconds they took."""
    pid = node.server_pid()
    assert pid is not None
    before, started = cpu_ticks(pid), time.perf_counter()
    done = subprocess.run(
        [redis_benchmark(), "-h", "127.0.0.1", "-p", str(node.port), "-P", str(PIPELINE),
         "-c", str(CLIENTS), "-n", str(calls), "-r", str(RANDOM_RANGE), "-q", *command],
        capture_output=True, text=True, timeout=900, check=False)
    took, ticks = time.perf_counter() - started, cpu_ticks(pid) - before
    out = done.stdout + done.stderr
    if done.returncode != 0 or "Error" in out:
        raise RuntimeError(f"redis-benchmark failed: {out[-1000:]}")
    return ticks, took


def _slice(node: RedisNode, client: SyncRedis, command: list[str], stock_key: str,
           calls: int) -> dict[str, float]:
    """`calls` calls of one contestant: the server's ticks, the stock taken, the seconds."""
    left = int(client.get(stock_key) or 0)
    ticks, took = bench_calls(node, command, calls)
    taken = left - int(client.get(stock_key) or 0)
    return {"calls": calls, "accepted": taken, "ticks": ticks, "seconds": took}


def measure(contestants: list[Contestant], calls: int, rounds: int, slices: int
            ) -> list[dict[str, Any]]:
    """`rounds` rounds on one private Redis; in each, the contestants take turns, `slices`
    turns each, so a change in the machine's load falls on all of them alike."""
    with RedisNode() as node:  # its own directory, removed when it stops
        client = SyncRedis.from_url(node.url, socket_timeout=10)
        out = []
        for r in range(rounds):
            order = contestants if r % 2 == 0 else contestants[::-1]
            opened = asyncio.run(_open(node.url, order, calls * 2))
            parts: dict[str, list[dict[str, float]]] = {who.name: [] for who in order}
            for _ in range(slices):
                for who in order:
                    parts[who.name].append(_slice(node, client, *opened[who.name],
                                                  calls // slices))
            row: dict[str, Any] = {"round": r + 1, "order": [c.name for c in order]}
            for name, runs in parts.items():
                total = {key: sum(run[key] for run in runs) for key in runs[0]}
                row[name] = {**total, "slices": len(runs),
                             "cpu_us_per_accepted": total["ticks"] / TICK
                             / max(total["accepted"], 1) * 1e6,
                             "ops_per_s": total["calls"] / total["seconds"]}
                print(f"round {r + 1} {name}: {row[name]['cpu_us_per_accepted']:.2f} "
                      f"us/accepted, {row[name]['ops_per_s']:,.0f} ops/s", flush=True)
            out.append(row)
        client.close()
    return out


def table(doc: dict[str, Any]) -> str:
    names = doc["contestants"]
    others = [n for n in names if n != "peer"]
    head = ["round", *(f"{n} us/accepted" for n in names), *(f"{n} ops/s" for n in names),
            *(f"{n} / peer" for n in others), "ticks (least)"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in doc["rounds"]:
        peer = row["peer"]["cpu_us_per_accepted"]
        cells = [str(row["round"]),
                 *(f"{row[n]['cpu_us_per_accepted']:.2f}" for n in names),
                 *(f"{row[n]['ops_per_s']:,.0f}" for n in names),
                 *(f"{row[n]['cpu_us_per_accepted'] / peer:.2f}x" for n in others),
                 str(min(row[n]["ticks"] for n in names))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"redis-benchmark -P {PIPELINE} -c {CLIENTS} -n {doc['calls']:,} "
              f"-r {RANDOM_RANGE} EVALSHA ...; CPU of the private redis-server "
              f"({doc['redis_version']}) per accepted call; {doc['mode']} run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gatescript", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short round (judges nothing)")
    p.add_argument("--baseline", type=Path, help="another seckill.lua, called as ours is")
    p.add_argument("--calls", type=int, help="calls per run (default: by mode)")
    p.add_argument("--rounds", type=int, help="rounds (default: by mode)")
    p.add_argument("--slices", type=int, default=SLICES, help="turns per contestant and round")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    calls, rounds = SIZES[mode]
    calls, rounds = args.calls or calls, args.rounds or rounds
    contestants = [Contestant("peer", PEER_SCRIPT),
                   Contestant("ours", lua_script("seckill.lua"), PID + 1)]
    if args.baseline:
        contestants.append(Contestant("baseline", args.baseline.read_text(), PID + 2))
    redis_benchmark()
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             check=False).stdout.split(" v=")[-1].split()[0]
    doc: dict[str, Any] = {"mode": mode, "calls": calls, "pipeline": PIPELINE,
                           "clients": CLIENTS, "redis_version": version,
                           "contestants": [c.name for c in contestants],
                           "baseline": str(args.baseline) if args.baseline else None,
                           "rounds": measure(contestants, calls, rounds, args.slices)}
    text = table(doc)
    path = write_result("gatescript", doc, text)
    print(text)
    print(f"written: {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
