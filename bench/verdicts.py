"""The benchmark's judgements, as pure functions: no services, no clock, no I/O.

Everything that decides whether a figure counts, or whether a target is met,
lives here so that a unit test can break it on purpose
(tests/test_bench_verdicts.py): a spread that crosses its bound, a drain
whose events never reached the tap queue, a CPU window too short for the
clock, a phase that timed out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# /proc counts CPU time in clock ticks (usually 1/100 s) and truncates each process's
# counter: a window of N ticks is off by up to a tick per process at each end. 100
# ticks (1 CPU-second at 100 Hz) keeps that error to a few percent.
MIN_TICKS = 100
# A target reads at least this many runs of each phase it depends on.
MIN_RUNS = 3
# The services whose CPU bounds the machine; every CPU table includes all three.
SERVICES = ("rabbitmq", "postgresql", "redis")
NOT_JUDGED_QUICK = "not judged (quick)"


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over the runs of a phase."""

    median: float
    low: float
    high: float
    runs: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


def spread(values: Iterable[float]) -> Spread | None:
    """The median and min-max of `values`; None when there is nothing to summarise."""
    vals = sorted(values)
    if not vals:
        return None
    return Spread(statistics.median(vals), vals[0], vals[-1], len(vals))


def on_right_side(value: float, op: str, bound: float) -> bool:
    if op == ">=":
        return value >= bound
    if op == "<=":
        return value <= bound
    raise ValueError(f"unknown comparison {op!r}")


def judge(values: Sequence[float], op: str, bound: float, *, judged: bool = True,
          problems: Sequence[str] = (), pooled: float | None = None) -> dict[str, Any]:
    """The verdict on one target from its per-run values.

    A target is met only when every run is on the right side of the bound:
    the median alone could sit on the right side by luck while the spread
    crosses it. A quick run is never judged; a failed phase, too few runs or
    a CPU window too short for the clock makes the target not met, whatever
    the figures say. `pooled`: a ratio of small costs (tracing's) is also judged on
    every run's measurements taken together (`pooled_trace_ratio`): met only when the
    pool and every run are on the right side.
    """
    s = spread(values)
    out: dict[str, Any] = {"op": op, "bound": bound, "values": list(values),
                           **(s.as_dict() if s else {"runs": 0})}
    if not judged:
        return {**out, "met": None, "verdict": NOT_JUDGED_QUICK}
    if problems:
        return {**out, "met": False, "verdict": "NO: " + "; ".join(problems)}
    if s is None or s.runs < MIN_RUNS:
        return {**out, "met": False,
                "verdict": f"NO: {s.runs if s else 0} run(s), {MIN_RUNS} needed"}
    right = [on_right_side(v, op, bound) for v in values]
    if pooled is not None:  # (and every run on the right side too, as any target)
        met = on_right_side(pooled, op, bound) and all(right)
        why = "" if met or not on_right_side(pooled, op, bound) else "spread crosses the bound; "
        return {**out, "pooled": pooled, "met": met,
                "verdict": f"{'yes' if met else 'NO'} ({why}all runs pooled: {pooled:.3f})"}
    if all(right):
        return {**out, "met": True, "verdict": "yes"}
    if any(right):
        return {**out, "met": False, "verdict": "NO (spread crosses the bound)"}
    return {**out, "met": False, "verdict": "NO"}


def paired(numerators: Sequence[float | None],
           denominators: Sequence[float | None]) -> list[float]:
    """Ratios of runs taken in the same round (a phase and the baseline it alternated
    with); a round where either side failed gives no ratio."""
    return [n / d for n, d in zip(numerators, denominators, strict=False)
            if n is not None and d]


def machine_limit(cores: float, cpu_per_order: Mapping[str, float]) -> float:
    """Orders/s the machine could reach if the engine's own processes cost nothing:
    `cores` divided by the CPU seconds per order RabbitMQ, PostgreSQL and Redis each
    spent alone in their ceiling phase.

    A service missing from the figures, or measured at no CPU at all, would make
    the limit look higher than the machine can go: that is refused, not summed as 0.
    """
    missing = [s for s in SERVICES if cpu_per_order.get(s, 0.0) <= 0.0]
    if missing:
        raise ValueError(f"no CPU per order measured for {', '.join(missing)}")
    return cores / sum(cpu_per_order[s] for s in SERVICES)


def short_windows(ticks: Mapping[str, int], groups: Iterable[str]) -> list[str]:
    """The CPU groups whose window held fewer than MIN_TICKS clock ticks."""
    return [f"{g} CPU over {ticks.get(g, 0)} ticks (< {MIN_TICKS})" for g in groups
            if ticks.get(g, 0) < MIN_TICKS]


def settle(total: int, rows: set[int], events: set[int], dead_letters: int,
           acked: int) -> dict[str, Any]:
    """What a drain processed: orders whose row is committed *and* whose event reached
    the tap queue, by instance ID. Acknowledgements prove neither: a dead-lettered
    entry is acknowledged too, so dead letters are counted apart and never as
    processed. Anything acknowledged that is neither processed nor dead-lettered is
    a lost order, and fails the phase."""
    processed = len(rows & events)
    out: dict[str, Any] = {"processed": processed, "dead_letters": dead_letters,
                           "acked": acked, "rows": len(rows), "events": len(events),
                           "rows_without_event": len(rows - events),
                           "events_without_row": len(events - rows)}
    lost = acked - processed - dead_letters
    problems = []
    if processed == 0:
        problems.append("no order has both its row and its event")
    if lost > 0:
        problems.append(f"{lost:,} acknowledged orders have no row with an event on the "
                        "tap queue and are not dead letters")
    if acked < total:
        problems.append(f"{acked:,} of {total:,} orders acknowledged")
    if problems:
        out["failed"] = "; ".join(problems)
    return out


def rate(orders: int, first_read: float, last_ack: float) -> float:
    """Orders per second over the window from the first read to the last
    acknowledgement; the batches in flight before the first ack are in it."""
    if last_ack <= first_read:
        raise ValueError("the window closes before it opens")
    return orders / (last_ack - first_read)


def runs_of(results: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The runs of one phase (failed ones included), [] when it did not run."""
    phase = results.get(key)
    if not phase:
        return []
    return list(phase.get("runs", [phase]))


def field(results: Mapping[str, Any], key: str, name: str) -> list[float | None]:
    """One figure of every run of a phase, None for a run that failed or lacks it:
    a list aligned on the rounds, so paired() keeps the alternation."""
    return [None if r.get("failed") or name not in r else float(r[name])
            for r in runs_of(results, key)]


def failures(results: Mapping[str, Any], *keys: str) -> list[str]:
    """Why runs of these phases failed, one line each."""
    return [f"{k} run {i + 1} failed ({r['failed']})" for k in keys
            for i, r in enumerate(runs_of(results, k)) if r.get("failed")]


# Issue 13: the BFF's CPU per accepted purchase against the floor plus the gate call.
HTTP_CPU_BOUND = 1.15
# In the warm window every token has been verified by every worker: verifications there
# mean the window measured cold requests too (an evicted cache, a missed worker).
MAX_WARM_VERIFIED = 0.01


def http_problems(run: Mapping[str, Any]) -> list[str]:
    """Why one run of the HTTP phase cannot judge the CPU target: a measured window too
    short for the clock, a warm window that verified tokens, a load not made by wrk (the
    Python client competes with the servers for the cores), nothing accepted."""
    if run.get("failed"):
        return []
    out = []
    for name in ("floor", "bff"):
        ticks = int(run.get(name, {}).get("ticks", 0))
        if ticks < MIN_TICKS:
            out.append(f"{name} CPU over {ticks} ticks (< {MIN_TICKS})")
    bff = run.get("bff", {})
    if not bff.get("accepted"):
        out.append("the BFF accepted no purchase")
    verified = float(bff.get("token_verifications", 0.0))
    if verified > MAX_WARM_VERIFIED * max(1, int(bff.get("requests", 0))):
        out.append(f"{verified:,.0f} tokens verified in the warm window of "
                   f"{int(bff.get('requests', 0)):,} requests")
    if run.get("client", "wrk") != "wrk":
        out.append(f"loaded by the {run.get('client')} client, not wrk")
    return out


# Issue 24: the engine's p99 (entry created -> acknowledged) at 50% of capacity against
# the broker's own confirm p99 at the same rate, measured in the same phase by a probe
# (bench/latency.broker_probe); at 90% of capacity an absolute bound.
P99_OVER_BROKER_BOUND = 1.5
P99_AT_90_BOUND_MS = 100.0
# Issue 24: the workers' CPU per order with 1,000 open sales, at most this times one
# sale's (the single Redis; the Redis Cluster's own row keeps its bound).
SCALE_BOUND = 1.3


def p99_over_broker(runs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[str]]:
    """Our p99 over the broker probe's p99, run by run, and why a run gives none: a failed
    phase, or no probe figure (a ratio against nothing would look met)."""
    ratios: list[float] = []
    problems: list[str] = []
    for i, run in enumerate(runs):
        ours, broker = run.get("p99_ms"), run.get("broker_p99_ms")
        if run.get("failed"):
            problems.append(f"run {i + 1} failed ({run['failed']})")
        elif ours is None or broker is None or not broker > 0:
            problems.append(f"run {i + 1} has no broker p99 to compare with")
        else:
            ratios.append(float(ours) / float(broker))
    return ratios, problems


# Issue 25: tracing's cost per purchase (BFF) and per order (engine) against a build
# without tracing, measured in the same round (bench/tracebench.py); 100% is reported.
TRACE_OFF_BOUND = 1.02  # trace_sample 0
TRACE_ONE_PERCENT_BOUND = 1.05  # trace_sample 0.01
NO_HISTORY = "not measured: no git history"  # no untraced build to compare with


def trace_sides(run: Mapping[str, Any], variant: str
                ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """(the untraced build's figures to set `variant`'s against, `variant`'s) of one
    round: the untraced worker that ran beside it when the round ran side by side
    (`paired`, bench/tracebench.py), else the round's untraced build."""
    variants = run.get("variants", {})
    base = run.get("paired", {}).get(variant) or variants.get("untraced")
    return base, variants.get(variant)


def pooled_trace_ratio(runs: Sequence[Mapping[str, Any]], variant: str, figure: str,
                       count: str) -> float | None:
    """`variant`'s `figure` over the untraced build's with every run's drains (or
    windows) taken together: each side's figure weighted by its `count` (orders,
    accepted purchases), i.e. its CPU time summed over its orders summed. One 90,000-
    order drain moves 8-15% from the next on these shared cores and a run holds two
    a variant, so a bound of 2% or 5% is judged on all of them at once, not on each
    run (docs/performance.md, issue 25). None when a side has nothing to pool."""
    sums = {"untraced": [0.0, 0.0], variant: [0.0, 0.0]}
    for run in runs:
        if run.get("failed"):
            continue
        got = {name: side or {} for name, side in zip(
            sums, trace_sides(run, variant), strict=True)}
        if any(side.get("failed") or not side.get(count) or side.get(figure) is None
               for side in got.values()):
            continue
        for name, side in got.items():
            sums[name][0] += float(side[figure]) * float(side[count])
            sums[name][1] += float(side[count])
    (base, n_base), (ours, n_ours) = sums["untraced"], sums[variant]
    if not (n_base and n_ours and base):
        return None
    return (ours / n_ours) / (base / n_base)


def trace_ratios(runs: Sequence[Mapping[str, Any]], variant: str, figure: str,
                 ticks_of: str | None = None) -> tuple[list[float], list[str]]:
    """Round by round, `variant`'s `figure` over the untraced build's (run["variants"]),
    and why a round gives none: a failed phase or drain, no untraced build, a figure
    missing, or a CPU window under MIN_TICKS (`ticks_of` names the group when a run's
    ticks are per group)."""
    ratios: list[float] = []
    problems: list[str] = []
    for i, run in enumerate(runs):
        if run.get("failed"):
            problems.append(f"run {i + 1} failed ({run['failed']})")
            continue
        sides = {name: side or {"failed": "not run"} for name, side in zip(
            ("untraced", variant), trace_sides(run, variant), strict=True)}
        why = [f"{name} {side['failed']}" for name, side in sides.items()
               if side.get("failed")]
        for name, side in sides.items():
            ticks = side.get("ticks", 0)
            ticks = ticks.get(ticks_of, 0) if isinstance(ticks, Mapping) else ticks
            if not side.get("failed") and int(ticks) < MIN_TICKS:
                why.append(f"{name} CPU over {ticks} ticks (< {MIN_TICKS})")
            if side.get("tokens_exhausted"):
                why.append(f"{name} ran out of buyers' tokens")
        base, ours = sides["untraced"].get(figure), sides[variant].get(figure)
        if not why and (ours is None or not base):
            why.append(f"no {figure} to compare")
        if why:
            problems.append(f"run {i + 1}: " + "; ".join(why))
        else:
            ratios.append(float(ours) / float(base))
    return ratios, problems
