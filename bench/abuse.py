"""`python -m bench.abuse`: what buyers get from the BFF while others abuse it.

A refused request should cost the BFF less than an honest one, or whoever sends
refusable requests fastest takes the gate from the buyers. Issue 21 found the
opposite: a badly signed token costs a signature check, the dearest work a request
can cost, and its sender nothing. Here an honest load (buyers whose tokens were
verified once, as in bench.bff) runs alone, then beside each kind of abuse, sent by
`--attackers` processes from another loopback address (another client to the BFF):

- forged: a token naming the issuer's key, signed by another key;
- unknown_kid: a token naming a key the JWKS does not have;
- garbage: a bearer of random characters;
- big_body: a 64 KB body behind the attacker's own valid token.

The abuse comes at a fixed rate (`--rate`), the same for both BFFs, so a cheaper
refusal shows as buyers served, not as more abuse answered. Two BFFs take turns,
window by window, on the same load: `--before` (by default
the failed-authentication throttle off: SECKILL_BFF_AUTH_FAILURE_RATE=0; or
`PYTHONPATH=/path/to/an/older/checkout`) and `--after` (this checkout's defaults).
Each row is the honest buyers' accepted purchases per second, what that is of
the same BFF's rate alone, and the BFF's CPU per abusive request (its CPU over the
window beyond what the honest requests cost it alone).

    python -m bench.abuse [--quick] [--seconds 3] [--attackers 1]

Writes bench/results/abuse-<time>.json and prints a Markdown table; `--quick` is
the test-sized run (well under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import uvloop

from engine.gate.devkeys import DevIssuer, init_keys
from engine.testing.processes import children

from .bff import (
    BFF_PIDS,
    WARMUP_PID,
    HttpBench,
    Load,
    buy_path,
    load_window,
    open_sales,
    wait_listening,
)
from .enginerun import TICK
from .env import bench_settings, prepare, reset
from .resultfiles import write_result
from .tokens import warm

ATTACKER = "127.0.0.2"  # the attackers' source address (all of 127/8 is loopback)
ATTACKER_USER = 3 * 10**12  # the big bodies' own buyer, apart from the honest ones
ABUSES = ("forged", "unknown_kid", "garbage", "big_body")
BIG_BODY = 64 * 1024
CONNECTIONS = 32  # the honest load's
ATTACK_CONNECTIONS = 16  # per attacker process
REPLY_TIMEOUT = 5.0


def variant(text: str) -> dict[str, str]:
    """"K=V,K2=V2" as a dict ("" = no override)."""
    return dict(part.split("=", 1) for part in text.split(",") if part)


def abuse_requests(directory: Path, settings: Any, pid: int, good: DevIssuer
                   ) -> dict[str, bytes]:
    """Each kind of abuse as the one HTTP request its attackers repeat (a refused
    token is never cached, so one is as dear as many)."""
    _, other_key = init_keys(directory / "other")
    other = DevIssuer(other_key, issuer=settings.bff_jwt_issuer,
                      audience=settings.bff_jwt_audience)
    unknown = other.token(ATTACKER_USER + 1, 3600)
    other.kid = good.kid
    tokens = {"forged": other.token(ATTACKER_USER + 1, 3600), "unknown_kid": unknown,
              "garbage": secrets.token_urlsafe(150),
              "big_body": good.token(ATTACKER_USER, 3600)}
    path = buy_path(pid).encode()
    out = {}
    for kind in ABUSES:
        body = b'{"user_id": %d}' % (ATTACKER_USER + 1)
        if kind == "big_body":
            body = b'{"user_id": %d, "pad": "%s"}' % (ATTACKER_USER, b"x" * BIG_BODY)
        out[kind] = (b"POST " + path + b" HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                     + tokens[kind].encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return out


async def _reply(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """One response's status code, and whether the server closes the connection."""
    status = (await reader.readline()).split(b" ", 2)
    if len(status) < 2:
        raise ConnectionResetError("closed")
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    await reader.readexactly(length)
    return status[1].decode(), close


async def _attack(port: int, request: bytes, seconds: float, connections: int,
                  rate: float) -> dict[str, int]:
    """`connections` clients sending `request` for `seconds`, `rate` per second in all
    (or as fast as answered): the answers by status code ("closed": a connection
    dropped, opened again)."""
    answers: Counter[str] = Counter()
    start = time.perf_counter()
    end = start + seconds
    interval = connections / rate

    async def paced(due: list[float]) -> None:
        """Wait for this client's next send; behind by over a second, start afresh."""
        now = time.perf_counter()
        if due[0] > now:
            await asyncio.sleep(due[0] - now)
        due[0] = max(due[0] + interval, now - 1.0)

    async def one(offset: float) -> None:
        due = [start + offset]
        while time.perf_counter() < end:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(ATTACKER, 0)), REPLY_TIMEOUT)
            except (OSError, TimeoutError):
                answers["connect_failed"] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                close = False
                while not close and time.perf_counter() < end:
                    await paced(due)
                    writer.write(request)
                    code, close = await asyncio.wait_for(_reply(reader), REPLY_TIMEOUT)
                    answers[code] += 1
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                answers["closed"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one(i * interval / connections) for i in range(connections)))
    return dict(answers)


def _attacker(args: tuple[int, bytes, float, int, float]) -> dict[str, int]:
    return uvloop.run(_attack(*args))


def _ready() -> bool:
    return True


async def window(pool: ProcessPoolExecutor, attackers: int, rate: float, proc: Any,
                 port: int, seconds: float, load: Load, abuse: bytes | None
                 ) -> dict[str, Any]:
    """One measured window of the honest load, beside `abuse` when given (`rate` per
    second in all, from `attackers` processes)."""
    loop = asyncio.get_running_loop()
    attacks = [loop.run_in_executor(pool, _attacker, (port, abuse, seconds,
                                                      ATTACK_CONNECTIONS, rate / attackers))
               for _ in range(attackers if abuse is not None else 0)]
    honest = await load_window(proc, port, seconds, CONNECTIONS, load)
    answers: Counter[str] = Counter()
    for part in await asyncio.gather(*attacks):
        answers.update(part)
    return {"honest": honest, "abuse_answers": dict(answers),
            "abuse_requests": sum(answers.values()),
            "abuse_per_second": sum(answers.values()) / seconds,
            "server_cpu_us": honest["ticks"] / TICK * 1e6}


async def run(settings: Any, variants: dict[str, dict[str, str]], seconds: float,
              tokens: int, attackers: int, rate: float, quiet_wait: float = 10.0
              ) -> dict[str, Any]:
    await reset(settings, [], quiet_wait=quiet_wait)
    phases = ("alone", *ABUSES)
    per_window = len(BFF_PIDS) // (len(phases) * len(variants))
    with tempfile.TemporaryDirectory(prefix="seckill-abuse-") as tmp:
        bench = HttpBench(settings, Path(tmp), tokens=tokens, cold_tokens=1)
        good = DevIssuer(bench.issuer.private, issuer=settings.bff_jwt_issuer,
                         audience=settings.bff_jwt_audience)
        requests = abuse_requests(Path(tmp), settings, WARMUP_PID, good)
        await open_sales(settings, [*BFF_PIDS, WARMUP_PID])
        pool = ProcessPoolExecutor(attackers, mp_context=multiprocessing.get_context("spawn"))
        servers = {name: bench.start_bff(env) for name, env in variants.items()}
        rows: list[dict[str, Any]] = []
        try:
            await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(pool, _ready)
                                   for _ in range(attackers)))
            for proc, port, _, log in servers.values():
                await wait_listening(port, proc, log.name)
                await warm(port, children(proc.pid), bench.warm_tokens, WARMUP_PID)
                await load_window(proc, port, min(1.0, seconds), CONNECTIONS, bench.warmup)
            used = 0
            for i, phase in enumerate(phases):
                order = list(variants) if i % 2 == 0 else list(reversed(variants))
                for name in order:
                    proc, port, _, _ = servers[name]
                    load = Load(tuple(buy_path(p) for p in BFF_PIDS[used:used + per_window]),
                                bench.warm_tokens)
                    used += per_window
                    w = await window(pool, attackers, rate, proc, port, seconds, load,
                                     requests.get(phase))
                    rows.append({"abuse": phase, "variant": name, **w})
                    print(f"  {phase:12} {name:7} honest {w['honest']['accepted_per_second']:8,.0f}"
                          f"/s  abuse {w['abuse_per_second']:8,.0f}/s {w['abuse_answers']}",
                          flush=True)
        finally:
            pool.shutdown()
            for proc, _, _, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _, _, log in servers.values():
                proc.wait(30)
                log.close()
    alone = {r["variant"]: r["honest"] for r in rows if r["abuse"] == "alone"}
    for r in rows:
        base = alone[r["variant"]]
        r["honest_share_of_alone"] = r["honest"]["accepted_per_second"] / max(
            1.0, base["accepted_per_second"])
        # the window's server CPU beyond what its honest requests cost alone
        extra = r["server_cpu_us"] - r["honest"]["requests"] * base["cpu_us_per_request"]
        r["server_cpu_us_per_abuse"] = extra / r["abuse_requests"] if r["abuse_requests"] \
            else None
    return {"variants": variants, "seconds": seconds, "attackers": attackers,
            "abuse_rate": rate,
            "attack_connections": ATTACK_CONNECTIONS, "honest_connections": CONNECTIONS,
            "client": rows[0]["honest"].get("client"), "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| abuse | BFF | honest accepted/s | of alone | honest p99 ms | abuse answered/s "
             "| BFF CPU us per abuse | abuse answers |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["abuse_answers"].items())) or "-"
        cost = r["server_cpu_us_per_abuse"]
        lines.append(f"| {r['abuse']} | {r['variant']} | "
                     f"{r['honest']['accepted_per_second']:,.0f} | "
                     f"{r['honest_share_of_alone']:.2f} | {r['honest']['p99_ms']:.1f} | "
                     f"{r['abuse_per_second']:,.0f} | "
                     f"{'-' if cost is None else f'{cost:.0f}'} | {answers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="SECKILL_BFF_AUTH_FAILURE_RATE=0",
                   help="the 'before' BFF's environment, K=V[,K=V]")
    p.add_argument("--after", default="", help="the 'after' BFF's environment, K=V[,K=V]")
    p.add_argument("--quick", action="store_true",
                   help="test-sized: 1.5 s windows, 1,000 buyers, one attacker process")
    p.add_argument("--seconds", type=float, default=4.0, help="per window")
    p.add_argument("--tokens", type=int, default=8_000, help="honest buyers")
    p.add_argument("--attackers", type=int, default=2, help="attacker processes")
    p.add_argument("--rate", type=float, default=2_000.0,
                   help="abusive requests per second, in all (the same for both BFFs)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.tokens, args.attackers = 1.5, 1_000, 1
    settings = bench_settings()
    prepare(settings)
    doc = asyncio.run(run(settings, {"before": variant(args.before),
                                     "after": variant(args.after)},
                          args.seconds, args.tokens, args.attackers, args.rate,
                          quiet_wait=1.0 if args.quick else 10.0))
    doc["quick"] = args.quick
    text = markdown(doc)
    print(text)
    path = write_result("abuse", doc, text)
    print(f"written: {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
