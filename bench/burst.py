"""`make burst`: one whole sale end to end, the figures a buyer of this system asks for.

"100,000 people press Buy at 10:00 for 5,000 GPU instances: how many attempts a second
does one box answer, how fast, when is it sold out, and when is every instance running?"
The real processes run on this machine's services: `seckill bff` (JWT on), `seckill run`
and `seckill resource-domain` (simulated provisioning), in the bench suite's database and
vhost (bench/env.py: a demo on the defaults is not disturbed), on a key prefix of their
own. bench/loadgen.c, an open-loop generator in C, sends the attempts on a schedule (see
its header for why), after a pre-sale phase in which a share of the users loads the sale
page with their token.

Each offered rate is its own sale. Times come from the generator's records (when each
attempt was due, sent and answered) and from seckill_logs (when each order was logged,
when it turned RUNNING), anchored to the same wall clock; CPU from /proc, per component.
The invariants after each sale are the load test's own checker (loadtest/verify.py:
the gate's stream and stock, the log's rows) plus what only the burst sees (the answers
the buyers got, the RUNNING status).

A full run, in this order (it fits in 10 minutes on a 2-core box):
0. the pre-sale's pace: a short burst of page loads (CALIBRATION_LOADS) on the first BFF
   measures how many a second this machine answers (each verifies a new token), and every
   pre-sale phase is sent at PRESALE_SHARE_OF_MEASURED of that (unless `--presale-rate`
   fixes it), so that it ends on schedule instead of tens of seconds late;
1. the sweep (`next_sweep_rate`): one sale of about `sweep_seconds` per offered rate,
   rising through `rates` while each holds; when the first does not, halving down to
   SWEEP_FLOOR until one holds; it ends at the first rate that does not hold above one
   that did (a rate holds with no 5xx, unanswered attempt, connection error or broken
   invariant, and p99 under P99_HELD_MS);
2. the headline: `attempts` (1,000,000) attempts at the highest rate that held, or as
   many as the time left allows (`headline_seconds`: the rest of the plan must fit in
   BUDGET_S, from what the sales so far took; none when not even a sweep sale's length
   fits). The sweep too stops early when one more sale would not leave a short headline
   and the judged rounds their time (`another_sweep_fits`); the report says what the
   budget cut;
3. `repeats` (3) rounds of: the HTTP floor (a bare app on the BFF's Granian interface,
   bench/floor.py, loaded by the same generator at the same rate), then a sale at 75% of
   the highest rate that held. Only these rounds are judged, each repeat on its own side
   of every bound: the server's CPU per answered attempt against the floor of the same
   round, edge p99/p99.9, sold out -> last order logged, sold out -> last RUNNING.
   Repeating the sweep and the headline too would not fit in 10 minutes;
4. "everyone cold": a sale at the highest rate that held with no pre-sale page loads, so
   every user's first press carries a token the BFF has not verified yet.

A sale with a pre-sale starts on a new BFF, its token caches empty, as a real sale's would
be but for the pre-sale page loads; the sales after it with the same pre-sale share keep
that BFF instead of loading the pages again (a warm BFF): on a slow 2-core box a pre-sale
of 80,000 new tokens takes about a minute, and six of them do not fit in 10 minutes. It
is the same state: a sold-out answer verifies no token (engine/gate/app.py), so a sale
leaves behind only the tokens of the first presses before it sold out (a few thousand,
a few % of the users). The cold sale starts on a new BFF with no pre-sale.

The budget: about 10 s a sale beyond its pre-sale and buy phase (new BFF, drain, checks),
a broken sweep rate cut short 5 s behind schedule, the headline cut to the time left,
15 s a floor window, one pre-sale (each page load verifies an RS256 signature and reads
the order: the report gives its rate and seconds); the tokens are minted once and kept.

`--quick` runs the same plan with a small sale and one round, and judges nothing.

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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import numpy as np
from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.auth import read_jwks
from engine.gate.redis_gate import Gate, Window
from engine.keys import Keys
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, children
from loadtest.verify import check_engine, check_gate, tried_key

from .bff import verifications
from .enginerun import (
    TICK,
    cpu_ticks,
    engine_env,
    machine_ticks,
    service_roots,
    service_ticks,
    ticks_between,
)
from .env import bench_settings, prepare
from .floor import start_floor
from .httpload import wait_listening
from .tokens import Issuer, TokenFile
from .verdicts import judge, paired

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
# the drain gives up once no order turned RUNNING for this long: a lost order never will
DRAIN_STALL = 10.0
LOADGEN_TIMEOUT = 600.0  # the longest a generator run may take (the headline's million)
# a rate the server answers this far behind schedule has not held: the generator stops
# sending (the rest counts as unanswered), so a broken sweep rate costs seconds, not minutes
GIVE_UP_BEHIND_S = 5.0
P99_HELD_MS = 200.0  # an offered rate holds while p99 stays under this and nothing errs
SWEEP_FLOOR = 1_000  # the lowest offered rate the sweep goes down to
BUDGET_S = 570.0  # a full run's plan is cut to fit this (`make burst`: under 10 minutes)
FLOOR_OVERHEAD_S = 5.0  # a floor window's start, warm-up and stop, beyond its seconds
SALE_OVERHEAD_S = 10.0  # a sale's new BFF, drain and checks, until one was measured
# the pre-sale's pace: page loads sent at this share of the rate measured on this machine
CALIBRATION_LOADS = 4_000
CALIBRATION_RATE = 20_000  # offered: more than any BFF here answers, so it measures it
PRESALE_SHARE_OF_MEASURED = 0.9
# the targets of issue 22, judged over the repeats of a full run
CPU_VS_FLOOR = 1.3
P99_MS = 50.0
P99_9_MS = 200.0
TO_LOGGED_S = 1.0
TO_RUNNING_S = 3.0
REPEAT_SHARE = 0.75  # the repeats run at this share of the highest rate that held
SERVICES = ("bff", "engine", "resource_domain", "redis", "rabbitmq", "postgresql")
# a part is full once it is this busy, of the cores it can use (or the machine of its cores)
FULL = 0.9


@dataclass(frozen=True)
class Scenario:
    """One run's shape; every field is a flag of `python -m bench.burst`."""

    users: int = 100_000
    stock: int = 5_000
    attempts: int = 1_000_000
    presale_share: float = 0.8  # users who load the sale page with their token beforehand
    retry_share: float = 0.2  # users who retry after 410/429 (bots)
    rates: tuple[int, ...] = (10_000, 20_000, 30_000, 40_000)
    sweep_floor: int = SWEEP_FLOOR  # the sweep halves down to this when a rate fails
    sweep_seconds: float = 20.0  # each sweep, repeat and cold sale lasts about this long
    presale_rate: int = 0  # page loads/s before the start; 0 = measured (module docstring)
    connections: int = 256
    bff_workers: int = 2
    engine_workers: int = 2
    rd_delay_ms: int = 0
    repeats: int = 3  # rounds of floor + sale at 75% of the highest rate that held
    floor_seconds: float = 10.0
    sweep_only: bool = False
    judged: bool = True

    @classmethod
    def quick(cls) -> Scenario:
        return cls(users=4_000, stock=500, attempts=20_000, rates=(4_000,), sweep_seconds=5.0,
                   connections=64, repeats=1, floor_seconds=2.0, judged=False,
                   sweep_floor=4_000)


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
        self.scenario = scenario
        self.jwks = jwks
        self.bff_used = False
        self.logs = tempfile.TemporaryDirectory(prefix="seckill-burst-")
        env = engine_env(settings, rd_delay_ms=scenario.rd_delay_ms)
        self.procs = {
            "bff": self._start_bff(),
            "engine": self._start(["run", "--workers", str(scenario.engine_workers)], env),
            "resource_domain": self._start(["resource-domain"], env),
        }

    def _start_bff(self) -> subprocess.Popen:
        self.port, self.admin = free_port(), free_port()
        env = engine_env(self.settings, bff_auth="jwt", bff_jwks=str(self.jwks),
                         bff_admin_port=self.admin,
                         # every buyer of the bench comes from 127.0.0.1: a per-IP limit
                         # would measure itself
                         bff_ip_rate=0)
        return self._start(["bff", "--port", str(self.port), "--workers",
                            str(self.scenario.bff_workers)], env)

    async def new_bff(self) -> None:
        """A new BFF, its token caches empty: every sale starts as a real one would, with
        only the tokens its own pre-sale page loads verified (not every earlier sale's)."""
        if not self.bff_used:
            self.bff_used = True
            return
        _stop(self.procs["bff"])
        self.procs["bff"] = self._start_bff()
        await self.ready()

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
            _stop(proc)
        self.logs.cleanup()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CpuMeter:
    """CPU seconds of each component and service, and of the whole machine, from start().

    The machine's busy time minus ours and the generator's is "other": on a quiet box
    it is near zero; when it is not, the run shared its cores with someone else."""

    def __init__(self, settings: Settings, stack: Stack) -> None:
        self.stack = stack
        self.roots = service_roots(settings)

    def _read(self) -> tuple[dict[str, dict[int, int]], int, float]:
        ours = {name: {p: cpu_ticks(p) for p in pids} for name, pids in self.stack.pids().items()}
        return {**ours, **service_ticks(self.roots)}, machine_ticks(), time.monotonic()

    def start(self) -> None:
        self.begin = self._read()

    def lap(self, generator_cpu_s: float) -> tuple[dict[str, float], float]:
        """CPU seconds per component since start() (the generator's and "other" too),
        and the wall seconds they were used in."""
        ticks, machine, now = self._read()
        cpu = {name: ticks_between(self.begin[0].get(name, {}), t) / TICK
               for name, t in ticks.items()}
        cpu["generator"] = generator_cpu_s
        cpu["other"] = max(0.0, (machine - self.begin[1]) / TICK - sum(cpu.values()))
        return cpu, now - self.begin[2]


@dataclass
class SaleRun:
    """What one sale measured: the generator's view, the database's and the CPU."""

    label: str
    rate: int
    attempts: int
    presale_share: float
    generator: dict[str, Any] = field(default_factory=dict)
    presale: dict[str, Any] = field(default_factory=dict)  # the page loads' generator summary
    outcomes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # sent - due: the schedule
    answered_per_s: float = 0.0
    times_s: dict[str, float | None] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_us_per_answered: dict[str, float] = field(default_factory=dict)
    cores_busy: dict[str, float] = field(default_factory=dict)  # during the buy phase
    breaks: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    invariants: list[str] = field(default_factory=list)
    held: bool = False
    timeline: dict[str, list[float]] = field(default_factory=dict)
    presale_rate: int = 0  # page loads/s the pre-sale was sent at
    seconds: dict[str, float] = field(default_factory=dict)  # presale, buy, total (wall)


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
    run.outcomes["not_sent"] = int((recs["sent"] == 0).sum())  # given up, behind schedule
    run.outcomes["5xx"] = int((answered["status"] >= 500).sum())
    run.latency_ms = {"all": _percentiles(latency)}
    for code in OUTCOMES:
        run.latency_ms[str(code)] = _percentiles(latency[answered["status"] == code])
    sent = recs[recs["sent"] != 0]
    run.send_lag_ms = _percentiles((sent["sent"] - np.minimum(sent["sent"], sent["due"])) / 1e6)
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


def sale_times(recs: np.ndarray, logged_s: np.ndarray, running_s: np.ndarray
               ) -> dict[str, float | None]:
    """Sold out (the last 202 answered), the last order logged, the last RUNNING, in
    seconds from the start, and the two gaps the targets read."""
    accepted = recs[recs["status"] == 202]
    sold_out = float(accepted["done"].max()) / 1e9 if len(accepted) else None
    last_logged = float(logged_s.max()) if len(logged_s) else None
    last_running = float(running_s.max()) if len(running_s) else None
    return {
        "sold_out": sold_out, "last_logged": last_logged, "last_running": last_running,
        "sold_out_to_last_logged": None if sold_out is None or last_logged is None
        else max(0.0, last_logged - sold_out),
        "sold_out_to_last_running": None if sold_out is None or last_running is None
        else max(0.0, last_running - sold_out),
    }


def held(run: SaleRun) -> bool:
    """An offered rate holds when every attempt was answered without a 5xx or a
    connection error, the invariants hold, and p99 stays under P99_HELD_MS."""
    return (not run.invariants and run.outcomes.get("5xx", 1) == 0
            and run.outcomes.get("no_answer", 1) == 0
            and run.generator.get("connect_errors", 1) == 0
            and run.latency_ms.get("all", {}).get("p99", 1e9) <= P99_HELD_MS)


def next_sweep_rate(tried: Mapping[int, bool], rates: Sequence[int],
                    floor: int = SWEEP_FLOOR) -> int | None:
    """The sweep's next offered rate from the rates tried so far (rate -> held), or None
    when it is done. It climbs `rates` while each holds; while none has held, it halves
    the lowest that failed, down to `floor`; once one held, it tries only the listed
    rates between the highest that held and the lowest that failed."""
    if not tried:
        return rates[0] if rates else None
    held_rates = [r for r, ok in tried.items() if ok]
    failed = [r for r, ok in tried.items() if not ok]
    ceiling = min(failed) if failed else None
    if held_rates:
        best = max(held_rates)
        above = [r for r in rates if r > best and r not in tried
                 and (ceiling is None or r < ceiling)]
        return min(above) if above else None
    assert ceiling is not None
    lower = max(floor, ceiling // 2)
    return lower if lower < ceiling and lower not in tried else None


def rest_seconds(*, repeats: int, sale_s: float, overhead_s: float, presale_s: float,
                 floor_s: float) -> float:
    """The plan after the headline: `repeats` rounds of a floor window (`floor_s`) and a
    sale with its pre-sale, then the cold sale (no pre-sale); each sale costs
    `overhead_s` beyond its pre-sale and its `sale_s` of buying."""
    return repeats * (floor_s + overhead_s + presale_s + sale_s) + overhead_s + sale_s


def headline_seconds(left_s: float, *, repeats: int, sale_s: float, overhead_s: float,
                     presale_s: float, floor_s: float) -> float:
    """The buying seconds the headline may take so that the rest of the plan still fits
    in `left_s` (`rest_seconds`)."""
    rest = rest_seconds(repeats=repeats, sale_s=sale_s, overhead_s=overhead_s,
                        presale_s=presale_s, floor_s=floor_s)
    return left_s - rest - overhead_s - presale_s


def another_sweep_fits(left_s: float, *, repeats: int, sale_s: float, overhead_s: float,
                       presale_s: float, floor_s: float) -> bool:
    """Whether one more sweep sale leaves time for a headline of a sweep sale's length
    and the rest of the plan (a slow box whose first rates fail must still judge)."""
    one_sale = overhead_s + presale_s + sale_s
    return headline_seconds(left_s - one_sale, repeats=repeats, sale_s=sale_s,
                            overhead_s=overhead_s, presale_s=presale_s,
                            floor_s=floor_s) >= sale_s


def answered_rate(done_ns: np.ndarray, skip: float = 0.25) -> float:
    """Answers per second of a burst offered faster than it is answered, over its steady
    part: from the answer that ends the first `skip` of them (a new BFF opens its
    connections and pools while the first ones wait) to the last."""
    done = np.sort(done_ns)
    first = int(len(done) * skip)
    span = (done[-1] - done[first]) / 1e9 if len(done) > first + 1 else 0.0
    return (len(done) - 1 - first) / span if span > 0 else 0.0


def paced_presale_rate(measured: float, ceiling: int) -> int:
    """The pre-sale's pace: PRESALE_SHARE_OF_MEASURED of the page loads answered per
    second in the calibration burst, at most `ceiling`, at least 100/s."""
    return max(100, min(ceiling, int(measured * PRESALE_SHARE_OF_MEASURED)))


def capacities(scenario: Scenario, machine_cores: int) -> dict[str, float]:
    """The cores each part can use at most: a worker is one process on one core, Redis
    runs its commands on one thread, the generator is one process; RabbitMQ and
    PostgreSQL spread over the machine. None can use more cores than the machine has."""
    caps = {"bff": scenario.bff_workers, "engine": scenario.engine_workers,
            "resource_domain": 1, "redis": 1, "generator": 1,
            "rabbitmq": machine_cores, "postgresql": machine_cores}
    return {k: float(min(v, machine_cores)) for k, v in caps.items()}


def breaking_point(cores_busy: Mapping[str, float], caps: Mapping[str, float],
                   machine_cores: float) -> dict[str, Any]:
    """Which part breaks first at this load, and why, from the cores each one kept busy.

    A part busy at FULL of the cores it can use is the one that breaks (the busiest such
    part, relative to its capacity). Short of that, when the whole machine is FULL (ours,
    the generator's and anyone else's CPU) the parts are fighting for its cores, and the
    one that takes the most of them is the one to make cheaper. Otherwise nothing is
    saturated: the limit is elsewhere (latency, a queue, a lock)."""
    use = {c: cores_busy.get(c, 0.0) / caps[c] for c in caps if caps[c] > 0}
    top = max(use, key=lambda c: use[c])
    total = sum(cores_busy.values())
    out: dict[str, Any] = {"use": use, "machine_busy": total / machine_cores}
    if use[top] >= FULL:
        return {**out, "part": top, "why": f"{top} keeps {cores_busy.get(top, 0):.2f} of the "
                f"{caps[top]:.0f} core(s) it can use busy ({use[top]:.0%})"}
    if total >= FULL * machine_cores:
        big = max((c for c in caps), key=lambda c: cores_busy.get(c, 0.0))
        other = cores_busy.get("other", 0.0)
        why = (f"the machine's {machine_cores:.0f} cores are {total / machine_cores:.0%} busy; "
               f"{big} takes the most of them ({cores_busy.get(big, 0):.2f} cores)")
        if other >= cores_busy.get(big, 0.0):
            # someone else's processes took more than any part of ours: the figures say
            # how the run shared a machine, not where the system breaks
            return {**out, "part": "other", "why": f"{why}, but processes outside the run "
                    f"took more ({other:.2f} cores): the machine was shared"}
        return {**out, "part": big, "why": f"{why} (processes outside the run {other:.2f})"}
    return {**out, "part": None, "why": f"no part is full (the busiest, {top}, at "
            f"{use[top]:.0%} of what it can use; the machine {total / machine_cores:.0%})"}


def token_cost(verified: float, verify_us: float, bff_cpu_s: float) -> dict[str, float]:
    """The token verifications of a sale and an estimate of their CPU: the count the BFF
    reports times PyJWT's own cost of one verification, measured in this process."""
    cpu_s = verified * verify_us / 1e6
    return {"verifications": verified, "verify_us": verify_us, "cpu_s": cpu_s,
            "share_of_bff": cpu_s / bff_cpu_s if bff_cpu_s else 0.0}


def measure_verify_us(tokens: TokenFile, jwks: Path, settings: Settings,
                      n: int = 300) -> float:
    """CPU microseconds of one RS256 verification of one of the users' tokens, as the
    BFF decodes it (engine/gate/auth.py), in this process."""
    token = tokens.path.read_bytes().split(b"\n", 1)[0].split(b" ", 1)[1]
    keys = read_jwks(str(jwks), 5.0)
    key = keys[str(jwt.get_unverified_header(token).get("kid") or "")]

    def decode() -> None:
        jwt.decode(token, key.key, algorithms=["RS256"], audience=settings.bff_jwt_audience,
                   issuer=settings.bff_jwt_issuer)

    decode()
    start = time.process_time()
    for _ in range(n):
        decode()
    return (time.process_time() - start) / n * 1e6


def _judge_or_skip(values: Sequence[float], op: str, bound: float, *, judged: bool,
                   problems: Sequence[str], skip: str | None = None) -> dict[str, Any]:
    if skip and judged:
        return {"op": op, "bound": bound, "values": list(values), "met": None,
                "verdict": f"not judged ({skip})"}
    return judge(values, op, bound, judged=judged, problems=problems)


def verdicts(repeats: Sequence[Mapping[str, Any]], floors: Sequence[Mapping[str, Any]], *,
             judged: bool, held_rate: int | None, rd_delay_ms: int) -> dict[str, Any]:
    """Issue 22's targets, from the repeats (sales at 75% of the highest rate that held)
    and the floor windows of the same rounds: met only when every repeat is on its side
    of the bound (bench/verdicts.py's judge: three runs at least, nothing failed)."""
    common = [] if held_rate is not None else ["no offered rate held"]
    for i, r in enumerate(repeats, 1):
        if r["invariants"]:
            common.append(f"repeat {i}: invariants broken")
        if r["outcomes"].get("5xx", 0) or r["outcomes"].get("no_answer", 0):
            common.append(f"repeat {i}: 5xx or unanswered attempts")
    floor_problems = [f"floor {i}: {f['no_answer']} requests unanswered"
                      for i, f in enumerate(floors, 1) if f.get("no_answer")]
    ratios = paired([r["cpu_us_per_answered"].get("server") for r in repeats],
                    [f.get("cpu_us_per_request") for f in floors])

    def times(key: str) -> tuple[list[float], list[str]]:
        vals = [r["times_s"].get(key) for r in repeats]
        missing = [f"repeat {i}: no {key.replace('_', ' ')}"
                   for i, v in enumerate(vals, 1) if v is None]
        return [v for v in vals if v is not None], missing

    def lat(key: str) -> list[float]:
        return [r["latency_ms"]["all"][key] for r in repeats if r["latency_ms"].get("all")]

    logged, no_logged = times("sold_out_to_last_logged")
    running, no_running = times("sold_out_to_last_running")
    return {
        "server_cpu_vs_floor": _judge_or_skip(
            ratios, "<=", CPU_VS_FLOOR, judged=judged, problems=common + floor_problems),
        "edge_p99_ms": _judge_or_skip(lat("p99"), "<=", P99_MS, judged=judged,
                                      problems=common),
        "edge_p99_9_ms": _judge_or_skip(lat("p99_9"), "<=", P99_9_MS, judged=judged,
                                        problems=common),
        "sold_out_to_last_logged_s": _judge_or_skip(
            logged, "<=", TO_LOGGED_S, judged=judged, problems=common + no_logged),
        "sold_out_to_last_running_s": _judge_or_skip(
            running, "<=", TO_RUNNING_S, judged=judged, problems=common + no_running,
            skip=f"Resource Domain delay {rd_delay_ms} ms, the target is for 0" if rd_delay_ms
            else None),
    }


class Burst:
    """A run: the tokens, the stack, then one sale per offered rate and the rest of the
    plan (the module docstring)."""

    def __init__(self, settings: Settings, scenario: Scenario, *,
                 prefix: str = PREFIX) -> None:
        self.settings = replace(settings, key_prefix=prefix)
        self.keys = Keys(prefix)
        self.scenario = scenario
        self.loadgen = build_loadgen()
        self.issuer = Issuer(WORK, issuer=settings.bff_jwt_issuer,
                             audience=settings.bff_jwt_audience)
        self.next_product = FIRST_PRODUCT
        self.machine_cores = os.cpu_count() or 1
        self.verify_us = 0.0
        self.presale_rate = scenario.presale_rate or CALIBRATION_RATE
        self.notes: list[str] = []  # what the budget cut, said in the report
        # the pre-sale share the running BFF was warmed with (a warm BFF: the module
        # docstring), None: not warmed
        self.presaled: float | None = None
        self.calibration: dict[str, Any] = {}
        # for the tests: a coroutine run beside each buy phase with the sale's (product,
        # sale ID), e.g. to break an invariant on purpose while the sale runs
        self.during_sale: Callable[[int, str], Coroutine[Any, Any, None]] | None = None

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
                "ON CONFLICT (id) DO NOTHING", pid, timeout=10)
            await conn.execute("DELETE FROM seckill_logs WHERE product_id = $1", pid,
                               timeout=30)
        finally:
            await conn.close()
        redis = Redis.from_url(self.settings.redis_url, socket_timeout=10)
        try:
            await redis.delete(self.keys.stream(pid), self.keys.buyers(pid),
                               tried_key(self.keys, pid))
            start = time.time() + start_in_s
            sale = await Gate(redis, self.keys).open_sale(
                pid, self.scenario.stock, clear_buyers=True,
                window=Window(start_ms=int(start * 1000)))
        finally:
            await redis.aclose()
        return pid, sale, start

    async def generate(self, port: int, tokens: TokenFile, pid: int, *, mode: str, rate: int,
                       count: int, first: int, records: Path, seed: int) -> dict[str, Any]:
        """One run of the generator: its JSON summary; its records in `records`."""
        sc = self.scenario
        args = [str(self.loadgen), "--port", str(port), "--tokens", str(tokens.path),
                "--product", str(pid), "--mode", mode, "--rate", str(rate), "--count", str(count),
                "--first", str(first), "--retry-share", str(sc.retry_share),
                "--connections", str(sc.connections), "--seed", str(seed),
                # the pre-sale loads all happen, however late: they decide who is warm
                "--give-up-behind", str(GIVE_UP_BEHIND_S if mode == "buy" else 0),
                "--out", str(records)]
        proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), LOADGEN_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the load generator ran over {LOADGEN_TIMEOUT:.0f} s") from None
        if proc.returncode:
            raise RuntimeError(f"the load generator exited {proc.returncode}")
        return dict(json.loads(out))

    async def sale(self, tokens: TokenFile, label: str, rate: int, attempts: int,
                   presale_share: float, seed: int) -> SaleRun:
        sc = self.scenario
        began = time.monotonic()
        run = SaleRun(label, rate, attempts, presale_share, presale_rate=self.presale_rate)
        lookers = int(sc.users * presale_share)
        if lookers and self.presaled == presale_share:
            lookers = 0  # the BFF a pre-sale warmed (the module docstring)
            run.presale = {"kept_warm_bff": True}
        else:
            await self.stack.new_bff()
            self.presaled = presale_share if lookers else None
        presale_s = lookers / self.presale_rate + 1.0 if lookers else 0.5
        pid, sale, start = await self.open_sale(presale_s)
        records = Path(tempfile.mkdtemp(prefix="seckill-burst-")) / "records.bin"
        try:
            if lookers:  # the sale page, loaded with a token before the start: 425 or 404
                run.presale = await self.generate(
                    self.stack.port, tokens, pid, mode="look", rate=self.presale_rate,
                    count=lookers, first=lookers, records=records, seed=seed)
            run.seconds["presale"] = time.monotonic() - began
            await asyncio.sleep(max(0.0, start - time.time()))
            before = await verifications(self.stack.admin)
            cpu = CpuMeter(self.settings, self.stack)
            cpu.start()
            hook: asyncio.Task[None] | None = (
                asyncio.create_task(self.during_sale(pid, sale)) if self.during_sale else None)
            run.generator = await self.generate(
                self.stack.port, tokens, pid, mode="buy", rate=rate, count=attempts,
                first=min(sc.users, attempts), records=records, seed=seed + 1)
            if hook:
                await asyncio.wait_for(hook, 120)
            buy_cpu, buy_s = cpu.lap(run.generator["generator_cpu_s"])
            run.seconds["buy"] = buy_s
            logged_s, running_s = await self.drained(pid, sale,
                                                     run.generator["start_unix_ns"] / 1e9)
            run.cpu_s, _ = cpu.lap(run.generator["generator_cpu_s"])
            run.tokens = token_cost(await verifications(self.stack.admin) - before,
                                    self.verify_us, run.cpu_s.get("bff", 0.0))
            recs = np.fromfile(records, dtype=RECORD)
        finally:
            shutil.rmtree(records.parent, ignore_errors=True)
        summarize(recs, run)
        answered = max(1, len(recs) - run.outcomes["no_answer"])
        run.cpu_us_per_answered = {k: v / answered * 1e6 for k, v in run.cpu_s.items()}
        run.cpu_us_per_answered["server"] = sum(run.cpu_us_per_answered[k] for k in SERVICES
                                                if k in run.cpu_us_per_answered)
        run.cores_busy = {k: v / buy_s for k, v in buy_cpu.items()} if buy_s else {}
        run.breaks = breaking_point(run.cores_busy, capacities(sc, self.machine_cores),
                                    self.machine_cores)
        run.times_s = sale_times(recs, logged_s, running_s)
        run.invariants = await self.check(pid, sale, recs, tokens)
        run.timeline = timeline(recs, logged_s, running_s, sc.stock)
        run.held = held(run)
        run.seconds["total"] = time.monotonic() - began
        return run

    async def drained(self, pid: int, sale: str, t0_unix: float
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Waits until every accepted order is RUNNING (or none turned RUNNING for
        DRAIN_STALL s, or DRAIN_TIMEOUT), then reads when each was logged and turned
        RUNNING, in seconds from the start."""
        stock = self.scenario.stock
        deadline = time.monotonic() + DRAIN_TIMEOUT
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            last, since = -1, time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - since < DRAIN_STALL:
                running = await conn.fetchval(
                    "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND sale_id = $2"
                    " AND status = 'RUNNING'", pid, sale, timeout=30)
                if running >= stock:
                    break
                if running != last:
                    last, since = running, time.monotonic()
                await asyncio.sleep(0.25)
            rows = await conn.fetch(
                "SELECT extract(epoch FROM created_at) AS logged, status,"
                " extract(epoch FROM updated_at) AS changed FROM seckill_logs"
                " WHERE product_id = $1 AND sale_id = $2", pid, sale, timeout=30)
        finally:
            await conn.close()
        logged = np.array([float(r["logged"]) - t0_unix for r in rows])
        running = np.array([float(r["changed"]) - t0_unix for r in rows
                            if r["status"] == "RUNNING"])
        return logged, running

    async def check(self, pid: int, sale: str, recs: np.ndarray, tokens: TokenFile
                    ) -> list[str]:
        """The sale's invariants: the load test's checker (accepted = min(stock, users who
        tried), no user twice, stock and slots, one row per accepted order with its own
        instance ID), then what the buyers were told (as many 202s as units, to the users
        logged) and every order RUNNING once."""
        tried = np.unique(recs["user"][recs["sent"] != 0]).astype(np.int64) + tokens.first_user
        redis = Redis.from_url(self.settings.redis_url, socket_timeout=30)
        key = tried_key(self.keys, pid)
        try:
            for at in range(0, len(tried), 10_000):
                await redis.sadd(key, *tried[at:at + 10_000].tolist())
            await redis.expire(key, 3600)
            problems = await check_gate(redis, self.keys, pid, sale, self.scenario.stock)
            problems += await check_engine(self.settings, redis, self.keys, pid, sale, None)
            await redis.delete(key)
        finally:
            await redis.aclose()
        stock = self.scenario.stock
        accepted_users = recs["user"][recs["status"] == 202].astype(np.int64) + tokens.first_user
        if len(accepted_users) != stock:
            problems.append(f"buyers were answered 202 {len(accepted_users)} times, "
                            f"stock {stock}")
        conn = await asyncpg.connect(self.settings.pg_dsn, timeout=10)
        try:
            rows = await conn.fetch("SELECT user_id, status FROM seckill_logs"
                                    " WHERE product_id = $1 AND sale_id = $2", pid, sale,
                                    timeout=30)
        finally:
            await conn.close()
        if {r["user_id"] for r in rows} != set(accepted_users.tolist()):
            problems.append("the logged buyers are not the ones answered 202")
        not_running = sum(r["status"] != "RUNNING" for r in rows)
        if not_running:
            problems.append(f"{not_running} orders not RUNNING")
        return problems

    async def floor(self, tokens: TokenFile, rate: int, seed: int) -> dict[str, Any]:
        """The HTTP floor at `rate`: a bare app on the BFF's Granian interface, with as
        many workers, loaded by the same generator with the same requests; its server's
        CPU per request (all its processes) over the window."""
        sc = self.scenario
        proc, port, log = start_floor(sc.bff_workers, self.settings.bff_interface)
        records = Path(tempfile.mkdtemp(prefix="seckill-burst-floor-")) / "records.bin"
        try:
            await wait_listening(port, proc, log.name)
            # every worker opens its connections and warms up outside the window
            await self.generate(port, tokens, FIRST_PRODUCT, mode="buy", rate=rate,
                                count=max(1, rate // 2), first=min(sc.users, rate // 2),
                                records=records, seed=seed)
            pids = [proc.pid, *children(proc.pid)]
            ticks = sum(cpu_ticks(p) for p in pids)
            gen = await self.generate(port, tokens, FIRST_PRODUCT, mode="buy", rate=rate,
                                      count=int(rate * sc.floor_seconds),
                                      first=min(sc.users, int(rate * sc.floor_seconds)),
                                      records=records, seed=seed + 1)
            ticks = sum(cpu_ticks(p) for p in pids) - ticks
            recs = np.fromfile(records, dtype=RECORD)
        finally:
            _stop(proc)
            log.close()
            shutil.rmtree(records.parent, ignore_errors=True)
        answered = recs[recs["status"] != 0]
        return {"rate": rate, "interface": self.settings.bff_interface,
                "workers": sc.bff_workers, "requests": int(len(answered)),
                "no_answer": int(len(recs) - len(answered)), "ticks": ticks,
                "cpu_us_per_request": ticks / TICK * 1e6 / max(1, len(answered)),
                "generator_us_per_request": gen["generator_cpu_s"] * 1e6 / max(1, len(answered)),
                "latency_ms": _percentiles((answered["done"] - answered["due"]) / 1e6),
                "generator": gen}

    async def _sale(self, runs: list[SaleRun], *args: Any, **kwargs: Any) -> SaleRun:
        print(f"burst: {args[1]} sale at {args[2]:,} attempts/s ({args[3]:,} attempts)",
              flush=True)
        runs.append(await self.sale(*args, **kwargs))
        print(row_text(runs[-1]), flush=True)
        return runs[-1]

    def costs(self, runs: Sequence[SaleRun]) -> dict[str, Any]:
        """The plan's figures for the budget, from what the sales so far took: a sale's
        seconds beyond its pre-sale and buying, and a pre-sale's (the longest of each)."""
        sc = self.scenario
        overheads = [r.seconds["total"] - r.seconds["presale"] - r.seconds["buy"]
                     for r in runs if {"total", "presale", "buy"} <= r.seconds.keys()]
        presales = [r.seconds["presale"] for r in runs if r.presale_share and r.seconds]
        return {"repeats": sc.repeats, "sale_s": sc.sweep_seconds,
                "floor_s": sc.floor_seconds + FLOOR_OVERHEAD_S,
                "overhead_s": max(overheads, default=SALE_OVERHEAD_S),
                # the next sales keep the BFF a pre-sale warmed: none to pay
                "presale_s": 0.0 if self.presaled else max(presales, default=0.0)}

    def headline_attempts(self, runs: Sequence[SaleRun], rate: int, began: float) -> int:
        """The headline's attempts: `attempts`, or fewer so that the plan fits BUDGET_S
        (from what the sales so far took); 0 when not even a sweep sale's fits."""
        sc = self.scenario
        seconds = headline_seconds(BUDGET_S - (time.monotonic() - began), **self.costs(runs))
        if seconds < sc.sweep_seconds and sc.judged:
            return 0
        least = min(sc.attempts, int(rate * sc.sweep_seconds))
        return max(least, min(sc.attempts, int(rate * seconds)))

    async def start(self) -> TokenFile:
        """The users' tokens, the cost of verifying one, and the stack, ready."""
        tokens = self.tokens()
        self.verify_us = measure_verify_us(tokens, self.issuer.jwks, self.settings)
        self.stack = Stack(self.settings, self.scenario, self.issuer.jwks)
        try:
            await self.stack.ready()
            if not self.scenario.presale_rate and self.scenario.presale_share > 0:
                await self.calibrate_presale(tokens)
        except BaseException:
            self.stack.stop()
            raise
        return tokens

    async def calibrate_presale(self, tokens: TokenFile) -> None:
        """The pre-sale's pace: CALIBRATION_LOADS page loads of users not seen yet, offered
        faster than any BFF here answers them; PRESALE_SHARE_OF_MEASURED of the rate they
        were answered at. Made on the first BFF, which the first sale then replaces (its
        caches hold these users)."""
        sc = self.scenario
        count = min(CALIBRATION_LOADS, sc.users)
        pid, _, _ = await self.open_sale(60.0)
        records = Path(tempfile.mkdtemp(prefix="seckill-burst-calibration-")) / "records.bin"
        try:
            gen = await self.generate(self.stack.port, tokens, pid, mode="look",
                                      rate=CALIBRATION_RATE, count=count, first=count,
                                      records=records, seed=7)
            recs = np.fromfile(records, dtype=RECORD)
        finally:
            shutil.rmtree(records.parent, ignore_errors=True)
        answered = recs[recs["status"] != 0]
        span = (answered["done"].max() - answered["due"].min()) / 1e9 if len(answered) else 0.0
        steady = answered_rate(answered["done"])
        self.presale_rate = paced_presale_rate(steady, CALIBRATION_RATE)
        self.stack.bff_used = True  # the first sale starts on a new BFF, its caches empty
        self.calibration = {"loads": count, "answered": int(len(answered)), "seconds": span,
                            "answered_per_s": steady, "presale_rate": self.presale_rate,
                            "generator_cpu_s": gen["generator_cpu_s"]}
        print(f"burst: pre-sale pace {self.presale_rate:,} page loads/s"
              f" ({PRESALE_SHARE_OF_MEASURED:.0%} of {self.calibration['answered_per_s']:,.0f}/s"
              f" measured over {count:,} new tokens)", flush=True)

    async def run(self) -> dict[str, Any]:
        sc = self.scenario
        began = time.monotonic()
        tokens = await self.start()
        runs: list[SaleRun] = []
        floors: list[dict[str, Any]] = []
        top: int | None = None
        try:
            tried: dict[int, bool] = {}
            rate = next_sweep_rate(tried, sc.rates, sc.sweep_floor)
            while rate is not None:
                attempts = min(sc.attempts, int(rate * sc.sweep_seconds))
                run = await self._sale(runs, tokens, f"sweep {rate}", rate, attempts,
                                       sc.presale_share, seed=10 * len(tried) + 1)
                tried[rate] = run.held
                rate = next_sweep_rate(tried, sc.rates, sc.sweep_floor)
                if rate is not None and sc.judged and not another_sweep_fits(
                        BUDGET_S - (time.monotonic() - began), **self.costs(runs)):
                    self.notes.append(f"the sweep stopped before {rate:,}/s: one more sale "
                                      f"would not leave the rest of the plan {BUDGET_S:.0f} s")
                    rate = None
            top = max((r for r, ok in tried.items() if ok), default=None)
            # a quick run goes through the whole plan even when its rate did not hold (on
            # a busy machine): it checks the code, not the figures
            plan_rate = top or (sc.rates[0] if not sc.judged else None)
            if not sc.sweep_only and plan_rate:
                headline = self.headline_attempts(runs, plan_rate, began)
                if headline:
                    await self._sale(runs, tokens, "headline", plan_rate, headline,
                                     sc.presale_share, seed=101)
                else:
                    self.notes.append(f"no headline: not even {sc.sweep_seconds:.0f} s of it "
                                      f"would leave the judged rounds {BUDGET_S:.0f} s")
                slower = int(plan_rate * REPEAT_SHARE)
                for i in range(sc.repeats):
                    print(f"burst: floor {i + 1} at {slower:,} requests/s", flush=True)
                    floors.append(await self.floor(tokens, slower, seed=301 + 10 * i))
                    print(f"  floor: {floors[-1]['cpu_us_per_request']:.1f} us server CPU per"
                          f" request, generator {floors[-1]['generator_us_per_request']:.1f} us",
                          flush=True)
                    await self._sale(runs, tokens, f"75% #{i + 1}", slower,
                                     min(sc.attempts, int(slower * sc.sweep_seconds)),
                                     sc.presale_share, seed=201 + 10 * i)
                await self._sale(runs, tokens, "everyone cold", plan_rate,
                                 min(sc.attempts, int(plan_rate * sc.sweep_seconds)), 0.0,
                                 seed=401)
        finally:
            self.stack.stop()
        repeats = [asdict(r) for r in runs if r.label.startswith("75%")]
        return {"scenario": asdict(sc), "machine_cores": self.machine_cores,
                "seconds": time.monotonic() - began, "presale_calibration": self.calibration,
                "notes": self.notes,
                "verify_us": self.verify_us, "runs": [asdict(r) for r in runs],
                "floors": floors, "highest_held_rate": top,
                "verdicts": verdicts(repeats, floors, judged=sc.judged, held_rate=top,
                                     rd_delay_ms=sc.rd_delay_ms)}


def row_text(r: SaleRun) -> str:
    lat = r.latency_ms.get("all", {})
    t = r.times_s
    return (f"  {r.label}: {r.attempts:,} attempts, pre-sale"
            f" {r.seconds.get('presale', 0):.1f} s; answered {r.answered_per_s:,.0f}/s,"
            f" p50 {lat.get('p50', 0):.1f} ms,"
            f" p99 {lat.get('p99', 0):.1f} ms, p99.9 {lat.get('p99_9', 0):.1f} ms;"
            f" sold out at {_s(t.get('sold_out'))}, +{_s(t.get('sold_out_to_last_logged'))}"
            f" to the last order logged, +{_s(t.get('sold_out_to_last_running'))} to the last"
            f" RUNNING; server {r.cpu_us_per_answered.get('server', 0):.0f} us CPU per answered"
            f" attempt; {r.tokens.get('verifications', 0):,.0f} tokens verified;"
            f" {'held' if r.held else 'NOT held'}"
            + (f"; invariants broken: {'; '.join(r.invariants)}" if r.invariants else ""))


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


BUSY = ("bff", "engine", "redis", "rabbitmq", "postgresql", "resource_domain", "generator",
        "other")


def markdown(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    lines = ["# Burst: one sale end to end", "",
             f"Scenario: {json.dumps(doc['scenario'])}; {doc['machine_cores']} cores; the run "
             f"took {doc.get('seconds', 0):.0f} s.", "",
             "| sale | offered/s | answered/s | 202 | 409 | 410 | 425 | 429 | 503 | 5xx |"
             " no answer (not sent) | p50 ms | p99 ms | p99.9 ms | max ms | sold out s |"
             " +logged s | +RUNNING s | server us/attempt | generator us | sent late p99/max ms |"
             " held |",
             "|" + "---|" * 22]
    for r in runs:
        o, lat, t = r["outcomes"], r["latency_ms"].get("all", {}), r["times_s"]
        lines.append(
            f"| {r['label']} | {r['rate']:,} | {r['answered_per_s']:,.0f} | "
            + " | ".join(f"{o.get(str(c), 0):,}" for c in OUTCOMES)
            + f" | {o['5xx']} | {o['no_answer']} ({o.get('not_sent', 0)}) |"
            f" {lat.get('p50', 0):.1f} |"
            f" {lat.get('p99', 0):.1f} | {lat.get('p99_9', 0):.1f} | {lat.get('max', 0):.1f} |"
            f" {_s(t['sold_out'])} | {_s(t['sold_out_to_last_logged'])} |"
            f" {_s(t['sold_out_to_last_running'])} |"
            f" {r['cpu_us_per_answered'].get('server', 0):.1f} |"
            f" {r['cpu_us_per_answered'].get('generator', 0):.1f} |"
            f" {r['send_lag_ms'].get('p99', 0):.1f}/{r['send_lag_ms'].get('max', 0):.1f} |"
            f" {'yes' if r['held'] else 'no'} |")
    lines += [f"\nBudget ({BUDGET_S:.0f} s): {note}." for note in doc.get("notes", [])]
    lines += ["", "Server = " + " + ".join(SERVICES) + "; generator and other processes "
              "apart. Latency is counted from when each attempt was due, not when it was sent;"
              f" \"not sent\": dropped by the generator once {GIVE_UP_BEHIND_S:.0f} s behind.",
              "", "## Targets", ""]
    lines += _verdict_lines(doc)
    lines += ["", "## CPU per answered attempt, microseconds", "",
              "| sale | " + " | ".join((*SERVICES, "server", "generator", "other")) + " |",
              "|---|" + "---|" * (len(SERVICES) + 3)]
    for r in runs:
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['cpu_us_per_answered'].get(c, 0):.1f}"
            for c in (*SERVICES, "server", "generator", "other")) + " |")
    if doc["floors"]:
        lines += ["", "The HTTP floor (a bare app on the same Granian interface and workers, "
                  "the same generator and requests):", "",
                  "| floor | rate/s | interface | requests | server us/request |"
                  " generator us/request | p99 ms | sent late max ms |", "|---|" + "---|" * 7]
        for i, f in enumerate(doc["floors"], 1):
            lines.append(f"| {i} | {f['rate']:,} | {f['interface']} | {f['requests']:,} |"
                         f" {f['cpu_us_per_request']:.1f} | {f['generator_us_per_request']:.1f} |"
                         f" {f['latency_ms'].get('p99', 0):.1f} |"
                         f" {f['generator'].get('max_behind_ms', 0):.1f} |")
    lines += ["", "## Where it breaks first", "",
              "Cores kept busy during the buy phase, per part (of the cores each can use: "
              + ", ".join(f"{k} {v:.0f}" for k, v in
                          capacities(_scenario(doc), doc["machine_cores"]).items()) + "):", "",
              "| sale | " + " | ".join(BUSY) + " | machine | breaks first |",
              "|---|" + "---|" * (len(BUSY) + 2)]
    for r in runs:
        b = r["breaks"]
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['cores_busy'].get(c, 0):.2f}" for c in BUSY)
            + f" | {b.get('machine_busy', 0):.0%} | {b.get('part') or '-'} |")
    lines += ["", breaking_summary(runs)]
    cal = doc.get("presale_calibration") or {}
    lines += ["", "## Token verifications in the buy phase (cold tokens)", "",
              f"PyJWT's RS256 verification of one token, in one process: "
              f"{doc['verify_us']:.0f} us CPU; the estimate is the BFF's count times that.",
              "" if not cal else f"The pre-sale's page loads (each verifies a new token "
              f"and reads the order) were sent at {cal['presale_rate']:,}/s: "
              f"{PRESALE_SHARE_OF_MEASURED:.0%} of the {cal['answered_per_s']:,.0f}/s "
              f"this machine answered over {cal['loads']:,} new tokens at the start.", "",
              "| sale | attempts | pre-sale share | pre-sale loads/s | pre-sale s |"
              " pre-sale late max s | verifications | est. CPU s | share of the BFF's CPU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        tk, sec = r["tokens"], r.get("seconds") or {}
        late = (r.get("presale") or {}).get("max_behind_ms")
        kept = (r.get("presale") or {}).get("kept_warm_bff")
        lines.append(f"| {r['label']} | {r['attempts']:,} | {r['presale_share']:.0%} |"
                     f" {r.get('presale_rate', 0) if r['presale_share'] and not kept else 0:,} |"
                     + (" kept the BFF it warmed |" if kept else
                        f" {sec.get('presale', 0) if r['presale_share'] else 0:.1f} |") +
                     f" {'-' if late is None else f'{late / 1000:.1f}'} |"
                     f" {tk.get('verifications', 0):,.0f} | {tk.get('cpu_s', 0):.2f} |"
                     f" {tk.get('share_of_bff', 0):.0%} |")
    broken = [(r["label"], r["invariants"]) for r in runs if r["invariants"]]
    lines += ["", "Invariants: " + ("all held" if not broken else "; ".join(
        f"{label}: {', '.join(p)}" for label, p in broken))]
    return "\n".join(lines) + "\n"


def _scenario(doc: dict[str, Any]) -> Scenario:
    known = {k: v for k, v in doc["scenario"].items() if k in Scenario.__dataclass_fields__}
    known["rates"] = tuple(known.get("rates", ()))
    return Scenario(**known)


def _verdict_lines(doc: dict[str, Any]) -> list[str]:
    names = {"server_cpu_vs_floor": f"server CPU per answered attempt / floor CPU per "
             f"request <= {CPU_VS_FLOOR}",
             "edge_p99_ms": f"edge p99 at 75% of the highest rate held <= {P99_MS:.0f} ms",
             "edge_p99_9_ms": f"edge p99.9 at 75% of the highest rate held <= "
             f"{P99_9_MS:.0f} ms",
             "sold_out_to_last_logged_s": f"sold out -> last order logged <= {TO_LOGGED_S} s",
             "sold_out_to_last_running_s": f"sold out -> last RUNNING <= {TO_RUNNING_S} s"}
    lines = [f"Judged over the repeats at 75% of the highest rate that held "
             f"({doc['highest_held_rate'] or 'none'}/s), every repeat on its side.", "",
             "| target | values | met |", "|---|---|---|"]
    for key, v in doc["verdicts"].items():
        values = ", ".join(f"{x:.2f}" for x in v.get("values", []))
        lines.append(f"| {names.get(key, key)} | {values or '-'} | {v['verdict']} |")
    return lines


def breaking_summary(runs: Sequence[Mapping[str, Any]]) -> str:
    """The sentence of the report: at the first sweep rate that did not hold (else the
    highest swept), which part broke first and why."""
    sweep = [r for r in runs if r["label"].startswith("sweep")]
    if not sweep:
        return "No sweep ran."
    failed = next((r for r in sweep if not r["held"]), None)
    r = failed or max(sweep, key=lambda x: x["rate"])
    b = r["breaks"]
    head = (f"At {r['rate']:,}/s, the first offered rate that did not hold" if failed
            else f"Every swept rate held; at the highest, {r['rate']:,}/s")
    if not b:
        return head + ": no CPU figures."
    if b.get("part") == "other":
        return f"{head}, no part of ours can be named: {b['why']}."
    if b.get("part"):
        return f"{head}, {b['part']} breaks first: {b['why']}."
    return f"{head}: {b['why']}."


def plot(doc: dict[str, Any], path: Path) -> None:
    """Attempts/s by outcome, stock left, orders logged and instances running against time,
    the start and the sold-out moment marked: one panel per sale of the story (the
    headline, the first 75% round, everyone cold), else per sale run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    story = [r for r in doc["runs"] if r["label"] in ("headline", "75% #1", "everyone cold")]
    runs = story or doc["runs"]
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
    p.add_argument("--quick", action="store_true", help="a small sale, one round: judges "
                   "nothing")
    d = Scenario()
    for name in ("users", "stock", "attempts", "presale_rate", "connections", "bff_workers",
                 "engine_workers", "rd_delay_ms", "repeats"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {getattr(d, name)}")
    for name in ("presale_share", "retry_share", "sweep_seconds", "floor_seconds"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                       help=f"default {getattr(d, name)}")
    p.add_argument("--rates", default=None, help="offered rates of the sweep, comma-separated "
                   f"(default {','.join(map(str, d.rates))})")
    p.add_argument("--sweep-only", action="store_true", help="the sweep only: no headline, "
                   "repeats, floor or cold row (judges nothing)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    scenario = Scenario.quick() if args.quick else Scenario()
    changes: dict[str, Any] = {k: v for k, v in vars(args).items()
                               if k in Scenario.__dataclass_fields__ and v is not None}
    if args.rates:
        changes["rates"] = tuple(int(x) for x in args.rates.split(","))
    if args.sweep_only:
        changes.update(sweep_only=True, judged=False)
    scenario = replace(scenario, **changes)
    settings = bench_settings()
    prepare(settings)
    doc = asyncio.run(Burst(settings, scenario).run())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"burst-{stamp}{'-quick' if args.quick else ''}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    base.with_suffix(".md").write_text(markdown(doc))
    plot(doc, base.with_suffix(".png"))
    print(markdown(doc))
    print(f"burst: {base}.json, .md, .png")
    broken = [r for r in doc["runs"] if r["invariants"]]
    unmet = [k for k, v in doc["verdicts"].items() if v["met"] is False]
    return 1 if broken or unmet else 0


if __name__ == "__main__":
    sys.exit(main())
