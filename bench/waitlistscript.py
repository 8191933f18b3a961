"""`python -m bench.waitlistscript [--quick]`: Redis's CPU per waitlist join and per handoff.

After sell-out the waitlist adds two scripts to the one Redis master that holds a
product: joining the line (engine/lua/waitlist.lua) and handing a returned unit to
its head (engine/lua/refund.lua). Measured as bench/gatescript.py measures the
purchase (its redis-benchmark driver and CPU reading, on a private redis-server):

- `purchase`: engine/lua/seckill.lua as `Gate.attempt` calls it, every call accepted
  (the reference row: what a unit costs the first time it is sold);
- `join`: waitlist.lua as `Gate.join_waitlist` calls it (window, per-user and per-IP
  limiter keys) on a sold-out sale, a new user every call, so every call joins;
- `handoff`: refund.lua as `Gate.return_unit` calls it, a new returned order every
  call, on a line long enough that every call hands its unit to the head (an XADD, a
  ZPOPMIN's worth of sorted-set work, the buyers and refunded sets);
- `to_stock`: the same script with nobody waiting: the unit goes back to stock (the
  path every return took before the waitlist).

The figure is the server's user + system CPU over the calls divided by the calls that
did their work (accepted, joined, handed, returned), contestants taking turns in short
slices. Written to bench/results/waitlistscript-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis as SyncRedis

from engine.config import Settings
from engine.connections import connect_redis
from engine.gate.redis_gate import Gate, Limits, Window
from engine.keys import Keys
from engine.resources import lua_script
from engine.testing.nodes import RedisNode

from .gatescript import CLIENTS, PIPELINE, RAND, TICK, bench_calls, redis_benchmark
from .resultfiles import write_result

PID = 990_000_970
SIZES = {"quick": (20_000, 1), "full": (200_000, 3)}  # calls per contestant and round, rounds
SLICES = 5
SENTINEL = 987_654_321_012  # a user ID in a key name, replaced by the placeholder
Counter = Callable[[SyncRedis], int]  # how many calls did their work so far


@dataclass(frozen=True)
class Contestant:
    name: str
    script: str
    pid: int

    async def open(self, redis: Any, calls: int) -> tuple[list[str], Counter]:
        """A sale ready for `calls` calls that all do their work: (the EVALSHA's keys and
        arguments after the SHA, the counter of calls that did)."""
        settings = Settings()
        k, pid = Keys(), self.pid
        gate = Gate(redis, k, limits=Limits(settings.bff_user_rate, settings.bff_user_burst,
                                            settings.bff_ip_rate, settings.bff_ip_burst),
                    waitlist_max=10**9)
        now_ms = int(time.time() * 1000)
        window = Window(now_ms - 60_000, now_ms + 86_400_000)
        limiter = k.user_limiter(pid, SENTINEL).replace(str(SENTINEL), RAND)
        if self.name == "purchase":
            await gate.open_sale(pid, calls * 2, window=window)
            keys = [k.stock(pid), k.sale(pid), k.buyers(pid), k.free_slots(pid),
                    k.stream(pid), k.window(pid), limiter, k.ip_limiter(pid, "127.0.0.1")]
            args = [RAND, str(int(time.time())), *map(str, gate.limits)]
            return [str(len(keys)), *keys, *args], _taken(k.stock(pid), calls * 2)
        sale = await gate.open_sale(pid, 1, window=window)
        await redis.set(k.stock(pid), 0)  # sold out
        if self.name == "join":
            keys = [k.stock(pid), k.sale(pid), k.buyers(pid), k.waitlist(pid),
                    k.waitlist_seq(pid), k.window(pid), limiter, k.ip_limiter(pid, "127.0.0.1")]
            args = [RAND, str(10**9), *map(str, gate.limits)]
            return [str(len(keys)), *keys, *args], _zcard(k.waitlist(pid))
        if self.name == "handoff":
            await _fill_line(redis, k.waitlist(pid), calls * 2)
        keys = [k.stock(pid), k.sale(pid), k.buyers(pid), k.free_slots(pid), k.refunded(pid),
                k.waitlist(pid), k.stream(pid), k.window(pid), k.waitlist_stats(pid)]
        args = [RAND, sale, "1", f"1-{RAND}"]  # a new returned order (stream ID) each call
        if self.name == "handoff":
            return [str(len(keys)), *keys, *args], _handed(k.waitlist_stats(pid))
        return [str(len(keys)), *keys, *args], _scard(k.refunded(pid))


async def _fill_line(redis: Any, key: str, users: int) -> None:
    """`users` waiting users, turns 1..users (user IDs above redis-benchmark's range,
    so that no returning user is one of them)."""
    for start in range(1, users + 1, 10_000):
        batch = {str(2**40 + t): t for t in range(start, min(start + 10_000, users + 1))}
        await redis.zadd(key, batch)


def _taken(key: str, stock: int) -> Counter:
    return lambda client: stock - int(client.get(key) or 0)


def _zcard(key: str) -> Counter:
    return lambda client: int(client.zcard(key))


def _scard(key: str) -> Counter:
    return lambda client: int(client.scard(key))


def _handed(key: str) -> Counter:
    return lambda client: int(client.hget(key, "handed") or 0)


async def _open(url: str, contestants: list[Contestant], calls: int
                ) -> dict[str, tuple[list[str], Counter]]:
    redis = await connect_redis(Settings().replace(redis_url=url))
    try:
        await redis.flushall()
        opened = {}
        for who in contestants:
            command, counter = await who.open(redis, calls)
            sha = await redis.script_load(who.script)
            opened[who.name] = (["EVALSHA", sha, *command], counter)
        return opened
    finally:
        await redis.aclose()


def _slice(node: RedisNode, client: SyncRedis, command: list[str], counter: Counter,
           calls: int) -> dict[str, float]:
    done_before = counter(client)
    ticks, _ = bench_calls(node, command, calls)
    return {"calls": calls, "done": counter(client) - done_before, "ticks": ticks}


def measure(contestants: list[Contestant], calls: int, rounds: int) -> list[dict[str, Any]]:
    with RedisNode() as node:
        client = SyncRedis.from_url(node.url, socket_timeout=10)
        out = []
        for r in range(rounds):
            order = contestants if r % 2 == 0 else contestants[::-1]
            opened = asyncio.run(_open(node.url, order, calls))
            parts: dict[str, list[dict[str, float]]] = {who.name: [] for who in order}
            for _ in range(SLICES):
                for who in order:
                    parts[who.name].append(_slice(node, client, *opened[who.name],
                                                  calls // SLICES))
            row: dict[str, Any] = {"round": r + 1}
            for name, runs in parts.items():
                total = {key: sum(run[key] for run in runs) for key in runs[0]}
                row[name] = {**total, "cpu_us_per_call": total["ticks"] / TICK
                             / max(total["done"], 1) * 1e6}
                print(f"round {r + 1} {name}: {row[name]['cpu_us_per_call']:.2f} us/call "
                      f"({total['done']:,} of {total['calls']:,} did their work)", flush=True)
            out.append(row)
        client.close()
    return out


def table(doc: dict[str, Any]) -> str:
    names = doc["contestants"]
    head = ["round", *(f"{n} us/call" for n in names),
            *(f"{n} / purchase" for n in names if n != "purchase")]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in doc["rounds"]:
        ref = row["purchase"]["cpu_us_per_call"]
        lines.append("| " + " | ".join([
            str(row["round"]), *(f"{row[n]['cpu_us_per_call']:.2f}" for n in names),
            *(f"{row[n]['cpu_us_per_call'] / ref:.2f}x" for n in names if n != "purchase")])
            + " |")
    lines += ["", f"redis-benchmark -P {PIPELINE} -c {CLIENTS} -n {doc['calls']:,} EVALSHA ...;"
              f" CPU of the private redis-server ({doc['redis_version']}) per call that did "
              f"its work; {doc['mode']} run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.waitlistscript", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short round")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    calls, rounds = SIZES[mode]
    contestants = [Contestant("purchase", lua_script("seckill.lua"), PID),
                   Contestant("join", lua_script("waitlist.lua"), PID + 1),
                   Contestant("handoff", lua_script("refund.lua"), PID + 2),
                   Contestant("to_stock", lua_script("refund.lua"), PID + 3)]
    redis_benchmark()
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             check=False).stdout.split(" v=")[-1].split()[0]
    doc = {"mode": mode, "calls": calls, "pipeline": PIPELINE, "clients": CLIENTS,
           "redis_version": version, "contestants": [c.name for c in contestants],
           "rounds": measure(contestants, calls, rounds)}
    text = table(doc)
    path = write_result("waitlistscript", doc, text)
    print(text)
    print(f"written: {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
