"""`make burst`: one whole sale end to end, the figures a buyer of this system asks for.

"100,000 people press Buy at 10:00 for 5,000 GPU instances: how many attempts a second
does one box answer, how fast, when is it sold out, and when is every instance running?"
The real processes run on this machine's services: `seckill bff` (JWT on), `seckill run`
and `seckill resource-domain` (simulated provisioning), on a key prefix, vhost queue
names and database rows of their own. bench/loadgen.c, an open-loop generator in C,
sends the attempts on a schedule (see its header for why), after a pre-sale phase in
which a share of the users loads the sale page with their token.

Each offered rate is its own sale. Times come from the generator's records (when each
attempt was due, sent and answered) and from seckill_logs (when each order was logged,
when it turned RUNNING), anchored to the same wall clock; CPU from /proc, per component.

    python -m bench.burst [--quick] [--rates 10000,20000] [--attempts N] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from redis.asyncio import Redis

from engine.config import Settings, load_settings
from engine.gate.client import Gate, Window
from engine.keys import Keys

from .bff import verifications, wait_listening
from .enginerun import (
    SECKILL,
    TICK,
    children,
    cpu_ticks,
    engine_env,
    free_port,
    service_roots,
    service_ticks,
    ticks_between,
)
from .tokens import Issuer, TokenFile

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).with_name("loadgen.c")
WORK = ROOT / ".seckill" / "burst"
RESULTS = Path(__file__).with_name("results")
RECORD = np.dtype([("due", "<u8"), ("sent", "<u8"), ("done", "<u8"), ("user", "<u4"),
                   ("status", "<u2"), ("retry", "<u2")])
OUTCOMES = (202, 409, 410, 425, 429, 503)
PREFIX = "burst:"
FIRST_PRODUCT = 970_001
DRAIN_TIMEOUT = 120.0
P99_HELD_MS = 200.0  # an offered rate holds while p99 stays under this and nothing errs


@dataclass(frozen=True)
class Scenario:
    """One sale's shape; every field is a flag of `python -m bench.burst`."""

    users: int = 100_000
    stock: int = 5_000
    attempts: int = 1_000_000
    presale_share: float = 0.8  # users who load the sale page with their token beforehand
    retry_share: float = 0.2  # users who retry after 410/429 (bots)
    rates: tuple[int, ...] = (10_000, 20_000, 30_000, 40_000)
    sweep_seconds: float = 20.0  # each sweep sale lasts about this long
    presale_rate: int = 20_000
    connections: int = 256
    bff_workers: int = 2
    engine_workers: int = 2
    rd_delay_ms: int = 0
    headline: bool = True

    @classmethod
    def quick(cls) -> Scenario:
        return cls(users=4_000, stock=500, attempts=20_000, rates=(4_000,), sweep_seconds=3.0,
                   presale_rate=4_000, connections=64, headline=False)


def build_loadgen(out_dir: Path = WORK) -> Path:
    """bench/loadgen.c compiled once per change of its source."""
    binary = out_dir / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler: apt-get install gcc (make burst installs it as root)")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(SOURCE)], check=True)
    return binary


class Stack:
    """The BFF, the engine and the Resource Domain of the burst, as child processes."""

    def __init__(self, settings: Settings, scenario: Scenario, jwks: Path) -> None:
        self.settings = settings
        self.port, self.admin = free_port(), free_port()
        self.logs = tempfile.TemporaryDirectory(prefix="seckill-burst-")
        env = engine_env(settings, bff_auth="jwt", bff_jwks=str(jwks), bff_admin_port=self.admin,
                         # every buyer of the bench comes from 127.0.0.1: a per-IP limit
                         # would measure itself
                         bff_ip_rate=0, rd_delay_ms=scenario.rd_delay_ms)
        self.procs = {
            "bff": self._start(["bff", "--port", str(self.port), "--workers",
                                str(scenario.bff_workers)], env),
            "engine": self._start(["run", "--workers", str(scenario.engine_workers)], env),
            "resource_domain": self._start(["resource-domain"], env),
        }

    def _start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(Path(self.logs.name) / f"{args[0]}.log", "wb")  # noqa: SIM115
        return subprocess.Popen([SECKILL, *args], env=env, stdout=log, stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        await wait_listening(self.port, self.procs["bff"], str(Path(self.logs.name) / "bff.log"))
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        path = Path(self.logs.name) / f"{name}.log"
        return path.read_text(errors="replace")[-800:] if path.exists() else ""

    def pids(self) -> dict[str, list[int]]:
        """Each component's processes that do the work (a supervisor's workers too)."""
        return {name: [proc.pid, *children(proc.pid)] for name, proc in self.procs.items()}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.logs.cleanup()


class CpuMeter:
    """Clock ticks of each component and service between start() and stop()."""

    def __init__(self, settings: Settings, stack: Stack) -> None:
        self.stack = stack
        self.roots = service_roots(settings)

    def _read(self) -> dict[str, dict[int, int]]:
        ours = {name: {p: cpu_ticks(p) for p in pids} for name, pids in self.stack.pids().items()}
        return {**ours, **service_ticks(self.roots)}

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per component."""
        end = self._read()
        return {name: ticks_between(self.begin.get(name, {}), t) / TICK
                for name, t in end.items()}


@dataclass
class SaleRun:
    """What one sale measured: the generator's view, the database's and the CPU."""

    label: str
    rate: int
    attempts: int
    presale_share: float
    generator: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    answered_per_s: float = 0.0
    times_s: dict[str, float | None] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_us_per_answered: dict[str, float] = field(default_factory=dict)
    token_verifications: float = 0.0
    invariants: list[str] = field(default_factory=list)
    held: bool = False
    timeline: dict[str, list[float]] = field(default_factory=dict)


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    if not len(ms):
        return {}
    p50, p99, p999 = np.percentile(ms, [50, 99, 99.9])
    return {"n": int(len(ms)), "p50": float(p50), "p99": float(p99), "p99_9": float(p999),
            "max": float(ms.max())}


def summarize(recs: np.ndarray, run: SaleRun) -> None:
    """Outcomes, latency from the time each attempt was due, per outcome and overall."""
    answered = recs[recs["status"] != 0]
    latency = (answered["done"] - answered["due"]) / 1e6
    run.outcomes = {str(code): int((answered["status"] == code).sum()) for code in OUTCOMES}
    run.outcomes["other"] = int(len(answered)) - sum(run.outcomes.values())
    run.outcomes["no_answer"] = int(len(recs) - len(answered))
    run.outcomes["5xx"] = int((answered["status"] >= 500).sum())
    run.latency_ms = {"all": _percentiles(latency)}
    for code in OUTCOMES:
        run.latency_ms[str(code)] = _percentiles(latency[answered["status"] == code])
    span = (answered["done"].max() - answered["due"].min()) / 1e9 if len(answered) else 0.0
    run.answered_per_s = len(answered) / span if span else 0.0


def timeline(recs: np.ndarray, logged_s: np.ndarray, running_s: np.ndarray, stock: int,
             bin_s: float = 0.1) -> dict[str, list[float]]:
    """Per bin: attempts answered by outcome (per second), stock left, orders logged and
    instances running so far; times from the start of the sale."""
    answered = recs[recs["status"] != 0]
    done_s = answered["done"] / 1e9
    end = max(float(done_s.max()) if len(done_s) else 0.0,
              float(running_s.max()) if len(running_s) else 0.0) + bin_s
    edges = np.arange(0.0, end + bin_s, bin_s)
    out: dict[str, list[float]] = {"t": edges[:-1].tolist()}
    for code in OUTCOMES:
        counts, _ = np.histogram(done_s[answered["status"] == code], edges)
        out[str(code)] = (counts / bin_s).tolist()
    accepted = np.cumsum(np.histogram(done_s[answered["status"] == 202], edges)[0])
    out["stock_left"] = (stock - accepted).tolist()
    out["logged"] = np.cumsum(np.histogram(logged_s, edges)[0]).tolist()
    out["running"] = np.cumsum(np.histogram(running_s, edges)[0]).tolist()
    return out


class Burst:
    """A run: the tokens, the stack, then one sale per offered rate."""

    def __init__(self, settings: Settings, scenario: Scenario, out: Path) -> None:
        self.settings = replace(settings, key_prefix=PREFIX)
        self.keys = Keys(PREFIX)
        self.scenario = scenario
        self.out = out
        self.loadgen = build_loadgen()
        self.issuer = Issuer(WORK, issuer=settings.bff_jwt_issuer,
                             audience=settings.bff_jwt_audience)
        self.next_product = FIRST_PRODUCT

    def tokens(self) -> TokenFile:
        """The users' tokens, minted once and kept for later runs (minting is not measured:
        RS256 signing costs about 0.6 ms a token)."""
        path = WORK / f"users-{self.scenario.users}.tokens"
        if path.exists() and path.stat().st_mtime >= self.issuer.jwks.stat().st_mtime:
            return TokenFile(path, 1, self.scenario.users)
        print(f"burst: minting {self.scenario.users:,} tokens (once; kept in {WORK})",
              flush=True)
        return self.issuer.mint(f"users-{self.scenario.users}", 1, self.scenario.users,
                                os.cpu_count() or 1)

    async def open_sale(self, start_in_s: float) -> tuple[int, str, float]:
        """A new product's sale, starting `start_in_s` from now: (product, sale ID, start)."""
        pid = self.next_product
        self.next_product += 1
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            await conn.execute(
                "INSERT INTO products (id, name, cpus, memory_mb, gpu, image) VALUES "
                "($1, 'burst', 8, 32768, 'H100', 'registry.example/burst:1') "
                "ON CONFLICT (id) DO NOTHING", pid)
            await conn.execute("DELETE FROM seckill_logs WHERE product_id = $1", pid)
        finally:
            await conn.close()
        redis = Redis.from_url(self.settings.redis_url, socket_timeout=10)
        try:
            await redis.delete(self.keys.stream(pid), self.keys.buyers(pid))
            start = time.time() + start_in_s
            sale = await Gate(redis, self.keys).open_sale(
                pid, self.scenario.stock, clear_buyers=True,
                window=Window(start_ms=int(start * 1000)))
        finally:
            await redis.aclose()
        return pid, sale, start

    def generate(self, tokens: TokenFile, pid: int, *, mode: str, rate: int, count: int,
                 first: int, records: Path, seed: int) -> dict[str, Any]:
        args = [str(self.loadgen), "--port", str(self.stack.port), "--tokens", str(tokens.path),
                "--product", str(pid), "--mode", mode, "--rate", str(rate), "--count", str(count),
                "--first", str(first), "--retry-share", str(self.scenario.retry_share),
                "--connections", str(self.scenario.connections), "--seed", str(seed),
                "--out", str(records)]
        done = subprocess.run(args, stdout=subprocess.PIPE, check=True)
        return dict(json.loads(done.stdout))

    async def sale(self, tokens: TokenFile, label: str, rate: int, attempts: int,
                   presale_share: float, seed: int) -> SaleRun:
        sc = self.scenario
        run = SaleRun(label, rate, attempts, presale_share)
        lookers = int(sc.users * presale_share)
        presale_s = lookers / sc.presale_rate + 1.0 if lookers else 0.5
        pid, sale, start = await self.open_sale(presale_s)
        records = Path(tempfile.mkdtemp(prefix="seckill-burst-")) / "records.bin"
        if lookers:  # the sale page, loaded with a token before the start: 425 or 404
            self.generate(tokens, pid, mode="look", rate=sc.presale_rate, count=lookers,
                          first=lookers, records=records, seed=seed)
        await asyncio.sleep(max(0.0, start - time.time()))
        before = await verifications(self.stack.admin)
        cpu = CpuMeter(self.settings, self.stack)
        cpu.start()
        run.generator = self.generate(tokens, pid, mode="buy", rate=rate, count=attempts,
                                      first=min(sc.users, attempts), records=records,
                                      seed=seed + 1)
        t0_unix = run.generator["start_unix_ns"] / 1e9
        logged_s, running_s = await self.drained(pid, sale, t0_unix)
        run.cpu_s = cpu.stop()
        run.token_verifications = await verifications(self.stack.admin) - before
        recs = np.fromfile(records, dtype=RECORD)
        shutil.rmtree(records.parent, ignore_errors=True)
        summarize(recs, run)
        answered = max(1, sum(v for k, v in run.outcomes.items()
                              if k not in ("no_answer", "5xx")))
        run.cpu_us_per_answered = {k: v / answered * 1e6 for k, v in run.cpu_s.items()}
        run.cpu_us_per_answered["server"] = sum(v for k, v in run.cpu_us_per_answered.items())
        run.cpu_us_per_answered["generator"] = run.generator["generator_cpu_s"] / answered * 1e6
        accepted = recs[recs["status"] == 202]
        sold_out = float(accepted["done"].max()) / 1e9 if len(accepted) else None
        last_logged = float(logged_s.max()) if len(logged_s) else None
        last_running = float(running_s.max()) if len(running_s) else None
        run.times_s = {
            "sold_out": sold_out, "last_logged": last_logged, "last_running": last_running,
            "sold_out_to_last_logged": None if None in (sold_out, last_logged)
            else max(0.0, last_logged - sold_out),  # type: ignore[operator]
            "sold_out_to_last_running": None if None in (sold_out, last_running)
            else max(0.0, last_running - sold_out),  # type: ignore[operator]
        }
        run.invariants = await self.check(pid, sale, recs, tokens)
        run.timeline = timeline(recs, logged_s, running_s, sc.stock)
        lat = run.latency_ms.get("all", {})
        run.held = (not run.invariants and run.outcomes["5xx"] == 0
                    and run.outcomes["no_answer"] == 0 and run.generator["connect_errors"] == 0
                    and lat.get("p99", 1e9) <= P99_HELD_MS)
        return run

    async def drained(self, pid: int, sale: str, t0_unix: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Waits until every accepted order is logged and RUNNING (or the drain timeout),
        then reads when each was logged and turned RUNNING, in seconds from the start."""
        stock = self.scenario.stock
        deadline = time.monotonic() + DRAIN_TIMEOUT
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            while time.monotonic() < deadline:
                running = await conn.fetchval(
                    "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND sale_id = $2"
                    " AND status = 'RUNNING'", pid, sale)
                if running >= stock:
                    break
                await asyncio.sleep(0.25)
            rows = await conn.fetch(
                "SELECT extract(epoch FROM created_at) AS logged, status,"
                " extract(epoch FROM updated_at) AS changed FROM seckill_logs"
                " WHERE product_id = $1 AND sale_id = $2", pid, sale)
        finally:
            await conn.close()
        logged = np.array([float(r["logged"]) - t0_unix for r in rows])
        running = np.array([float(r["changed"]) - t0_unix for r in rows
                            if r["status"] == "RUNNING"])
        return logged, running

    async def check(self, pid: int, sale: str, recs: np.ndarray, tokens: TokenFile
                    ) -> list[str]:
        """The sale's invariants: accepted = stock, each accepted order logged once with
        its own instance ID, RUNNING once, no user twice, nothing lost."""
        problems = []
        stock = self.scenario.stock
        accepted_users = recs["user"][recs["status"] == 202].astype(np.int64) + tokens.first_user
        if len(accepted_users) != stock:
            problems.append(f"accepted {len(accepted_users)} attempts, stock {stock}")
        if len(set(accepted_users.tolist())) != len(accepted_users):
            problems.append("a user was accepted twice")
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            rows = await conn.fetch("SELECT user_id, instance_id, slot, status FROM seckill_logs"
                                    " WHERE product_id = $1 AND sale_id = $2", pid, sale)
        finally:
            await conn.close()
        users = [r["user_id"] for r in rows]
        if len(rows) != stock:
            problems.append(f"{len(rows)} orders logged, stock {stock}")
        if len(set(users)) != len(users):
            problems.append("a user has two logged orders")
        if len({r["instance_id"] for r in rows}) != len(rows):
            problems.append("two orders share an instance ID")
        if len({r["slot"] for r in rows}) != len(rows):
            problems.append("two orders share a unit of stock")
        if set(users) != set(accepted_users.tolist()):
            problems.append("the logged buyers are not the accepted ones")
        not_running = sum(r["status"] != "RUNNING" for r in rows)
        if not_running:
            problems.append(f"{not_running} orders not RUNNING after {DRAIN_TIMEOUT:.0f} s")
        return problems

    async def run(self) -> dict[str, Any]:
        sc = self.scenario
        tokens = self.tokens()
        self.stack = Stack(self.settings, sc, self.issuer.jwks)
        runs: list[SaleRun] = []
        try:
            await self.stack.ready()
            for i, rate in enumerate(sc.rates):
                attempts = min(sc.attempts, int(rate * sc.sweep_seconds))
                print(f"burst: sweep sale at {rate:,} attempts/s ({attempts:,} attempts)",
                      flush=True)
                runs.append(await self.sale(tokens, f"sweep {rate}", rate, attempts,
                                            sc.presale_share, seed=10 * i + 1))
                print(row_text(runs[-1]), flush=True)
            held = [r.rate for r in runs if r.held]
            if sc.headline and held:
                top = max(held)
                print(f"burst: headline sale, {sc.attempts:,} attempts at {top:,}/s", flush=True)
                runs.append(await self.sale(tokens, "headline", top, sc.attempts,
                                            sc.presale_share, seed=101))
                print(row_text(runs[-1]), flush=True)
                runs.append(await self.sale(tokens, "everyone cold", top,
                                            min(sc.attempts, int(top * sc.sweep_seconds)), 0.0,
                                            seed=201))
                print(row_text(runs[-1]), flush=True)
        finally:
            self.stack.stop()
        return {"scenario": asdict(sc), "runs": [asdict(r) for r in runs],
                "highest_held_rate": max((r.rate for r in runs if r.held), default=None)}


def row_text(r: SaleRun) -> str:
    lat = r.latency_ms.get("all", {})
    t = r.times_s
    return (f"  {r.label}: answered {r.answered_per_s:,.0f}/s, p50 {lat.get('p50', 0):.1f} ms,"
            f" p99 {lat.get('p99', 0):.1f} ms, p99.9 {lat.get('p99_9', 0):.1f} ms;"
            f" sold out at {_s(t.get('sold_out'))}, +{_s(t.get('sold_out_to_last_logged'))}"
            f" to the last order logged, +{_s(t.get('sold_out_to_last_running'))} to the last"
            f" RUNNING; server {r.cpu_us_per_answered.get('server', 0):.0f} us CPU per answered"
            f" attempt; {'held' if r.held else 'NOT held'}"
            + (f"; invariants broken: {'; '.join(r.invariants)}" if r.invariants else ""))


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Burst: one sale end to end", "",
             f"Scenario: {json.dumps(doc['scenario'])}", "",
             "| sale | offered/s | answered/s | 202 | 409 | 410 | 425 | 429 | 503 | 5xx |"
             " p50 ms | p99 ms | p99.9 ms | max ms | sold out s | +logged s | +RUNNING s |"
             " server us/attempt | generator us | behind ms | held |",
             "|" + "---|" * 21]
    for r in doc["runs"]:
        o, lat, t = r["outcomes"], r["latency_ms"].get("all", {}), r["times_s"]
        lines.append(
            f"| {r['label']} | {r['rate']:,} | {r['answered_per_s']:,.0f} | "
            + " | ".join(f"{o.get(str(c), 0):,}" for c in OUTCOMES)
            + f" | {o['5xx']} | {lat.get('p50', 0):.1f} | {lat.get('p99', 0):.1f} |"
            f" {lat.get('p99_9', 0):.1f} | {lat.get('max', 0):.1f} | {_s(t['sold_out'])} |"
            f" {_s(t['sold_out_to_last_logged'])} | {_s(t['sold_out_to_last_running'])} |"
            f" {r['cpu_us_per_answered'].get('server', 0):.1f} |"
            f" {r['cpu_us_per_answered'].get('generator', 0):.1f} |"
            f" {r['generator'].get('max_behind_ms', 0):.1f} | {'yes' if r['held'] else 'no'} |")
    lines += ["", "CPU per answered attempt, microseconds, by component:", "",
              "| sale | " + " | ".join(_components(doc)) + " |",
              "|---|" + "---|" * len(_components(doc))]
    for r in doc["runs"]:
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['cpu_us_per_answered'].get(c, 0):.1f}" for c in _components(doc)) + " |")
    broken = [(r["label"], r["invariants"]) for r in doc["runs"] if r["invariants"]]
    lines += ["", "Invariants: " + ("all held" if not broken else "; ".join(
        f"{label}: {', '.join(p)}" for label, p in broken))]
    return "\n".join(lines) + "\n"


def _components(doc: dict[str, Any]) -> list[str]:
    return list(doc["runs"][0]["cpu_us_per_answered"]) if doc["runs"] else []


def plot(doc: dict[str, Any], path: Path) -> None:
    """Attempts/s by outcome, stock left, orders logged and instances running against time,
    the start and the sold-out moment marked: one panel per sale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs, strict=True):
        tl = r["timeline"]
        for code in OUTCOMES:
            if any(tl[str(code)]):
                ax.plot(tl["t"], tl[str(code)], label=f"{code}/s", linewidth=1)
        ax.set_ylabel("attempts/s")
        ax.axvline(0, color="grey", linestyle=":", label="start")
        if r["times_s"]["sold_out"] is not None:
            ax.axvline(r["times_s"]["sold_out"], color="red", linestyle="--", label="sold out")
        right = ax.twinx()
        right.plot(tl["t"], tl["stock_left"], color="black", label="stock left")
        right.plot(tl["t"], tl["logged"], color="tab:purple", label="logged")
        right.plot(tl["t"], tl["running"], color="tab:green", label="RUNNING")
        right.set_ylabel("units")
        ax.set_title(f"{r['label']}: offered {r['rate']:,}/s")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the start of the sale")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small sale, for the tests: judges "
                   "nothing")
    d = Scenario()
    for name in ("users", "stock", "attempts", "presale_rate", "connections", "bff_workers",
                 "engine_workers", "rd_delay_ms"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {getattr(d, name)}")
    for name in ("presale_share", "retry_share", "sweep_seconds"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                       help=f"default {getattr(d, name)}")
    p.add_argument("--rates", default=None, help="offered rates of the sweep, comma-separated "
                   f"(default {','.join(map(str, d.rates))})")
    p.add_argument("--no-headline", action="store_true", help="the sweep only")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    scenario = Scenario.quick() if args.quick else Scenario()
    changes: dict[str, Any] = {k: v for k, v in vars(args).items()
                               if k in Scenario.__dataclass_fields__ and v is not None}
    if args.rates:
        changes["rates"] = tuple(int(x) for x in args.rates.split(","))
    if args.no_headline:
        changes["headline"] = False
    scenario = replace(scenario, **changes)
    doc = asyncio.run(Burst(load_settings(), scenario, args.out).run())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"burst-{stamp}{'-quick' if args.quick else ''}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    base.with_suffix(".md").write_text(markdown(doc))
    plot(doc, base.with_suffix(".png"))
    print(markdown(doc))
    print(f"burst: {base}.json, .md, .png")
    broken = [r for r in doc["runs"] if r["invariants"]]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
