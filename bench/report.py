"""The suite's human outputs: the targets as ratios, a markdown table, and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .verdicts import (
    HTTP_CPU_BOUND,
    P99_AT_90_BOUND_MS,
    P99_OVER_BROKER_BOUND,
    SCALE_BOUND,
    SERVICES,
    TRACE_OFF_BOUND,
    TRACE_ONE_PERCENT_BOUND,
    failures,
    field,
    http_problems,
    judge,
    machine_limit,
    p99_over_broker,
    paired,
    pooled_trace_ratio,
    runs_of,
    short_windows,
    spread,
    trace_ratios,
    trace_sides,
)


def machine_limits(r: dict[str, Any], cores: float) -> list[float | None]:
    """Per round: cores / (RabbitMQ + PostgreSQL + Redis CPU per order, each alone in its
    ceiling phase of that round); None for a round where one of them is missing."""
    out: list[float | None] = []
    phases = [runs_of(r, key) for key, _ in LIMIT_SOURCES]
    for runs in zip(*phases, strict=False):
        try:
            per_order = {svc: run["cpu_us"][svc] / 1e6
                         for run, (_, svc) in zip(runs, LIMIT_SOURCES, strict=True)
                         if not run.get("failed")}
            out.append(machine_limit(cores, per_order))
        except (KeyError, ValueError):
            out.append(None)
    return out


# the ceiling phase in which each service's CPU per order is measured alone
LIMIT_SOURCES = (("ceiling_publish_batched", "rabbitmq"), ("ceiling_copy", "postgresql"),
                 ("ceiling_redis", "redis"))


def tick_problems(r: dict[str, Any], key: str, groups: tuple[str, ...]) -> list[str]:
    """CPU windows of a phase's runs too short for the clock, one line each."""
    return [f"{key} run {i + 1}: {p}" for i, run in enumerate(runs_of(r, key))
            if not run.get("failed") for p in short_windows(run.get("ticks", {}), groups)]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark issue, from this run's own baselines, judged over
    the runs of every round (bench/verdicts.py says when a target is met)."""
    r, cores = doc["results"], doc["machine"]["cores"]
    judged = doc["mode"] != "quick"
    e2 = field(r, "engine_2w", "per_second")
    publish = [max(a or 0.0, b or 0.0) or None for a, b in
               zip(field(r, "ceiling_publish_plain", "per_second"),
                   field(r, "ceiling_publish_batched", "per_second"), strict=False)]
    limit_ticks = [p for key, svc in LIMIT_SOURCES for p in tick_problems(r, key, (svc,))]
    rows: list[tuple[str, list[float], str, float, list[str]]] = [
        ("engine (2 workers) / naive", paired(e2, field(r, "naive", "per_second")), ">=", 12.0,
         failures(r, "engine_2w", "naive")),
        ("engine (2 workers) / publish-with-confirms ceiling", paired(e2, publish), ">=", 0.9,
         failures(r, "engine_2w", "ceiling_publish_plain", "ceiling_publish_batched")),
        ("engine (2 workers) / machine limit", paired(e2, machine_limits(r, cores)), ">=", 0.85,
         failures(r, "engine_2w", *(k for k, _ in LIMIT_SOURCES)) + limit_ticks),
        ("worker CPU per order, us (2 workers)", _present(field(r, "engine_2w",
                                                                "cpu_us_per_order")),
         "<=", 9.0, failures(r, "engine_2w") + tick_problems(r, "engine_2w", ("workers",))),
        ("p99 at 50% load / the broker's own confirm p99 at that rate",
         *_over_broker(runs_of(r, "latency_50"))),
        ("p99 at 90% load, ms", _present(field(r, "latency_90", "p99_ms")), "<=",
         P99_AT_90_BOUND_MS, failures(r, "latency_90")),
        ("CPU per order, 1000 sales / 1 sale",
         paired(field(r, "scale_1000", "cpu_us_per_order"),
                field(r, "scale_1", "cpu_us_per_order")), "<=", SCALE_BOUND,
         failures(r, "scale_1", "scale_1000") + tick_problems(r, "scale_1", ("workers",))
         + tick_problems(r, "scale_1000", ("workers",))),
        ("peak RSS per worker, MB",
         [max(a, b) for a, b in zip(field(r, "engine_2w", "peak_rss_mb"),
                                    field(r, "engine_1w", "peak_rss_mb"), strict=False)
          if a is not None and b is not None], "<=", 80.0,
         failures(r, "engine_1w", "engine_2w")),
    ]
    if "bff" in r:
        http = [p for i, run in enumerate(runs_of(r, "bff"))
                for p in (f"bff run {i + 1}: {x}" for x in http_problems(run))]
        rows.append(("HTTP gate CPU per accepted purchase / (HTTP floor on the BFF's "
                     "Granian interface + direct gate), JWT on, tokens verified once",
                     _present(field(r, "bff", "cpu_ratio")),
                     "<=", HTTP_CPU_BOUND, failures(r, "bff") + http))
        rows.append(("HTTP gate / direct gate, accepted/s", _present(field(r, "bff", "ratio")),
                     ">=", 0.8, failures(r, "bff")))
        rows.append(("HTTP gate p99 at 64 connections, ms",
                     [run["bff"]["p99_ms"] for run in runs_of(r, "bff") if not run.get("failed")],
                     "<=", 20.0, failures(r, "bff")))
    rows += cluster_targets(r)
    pooled = {name: value for name, value in trace_pooled(r)}
    rows += trace_targets(r)
    if "soak" in r:
        growth = [run["rss_end_mb"] / run["rss_start_mb"] - 1 for run in runs_of(r, "soak")
                  if not run.get("failed") and run.get("rss_start_mb")]
        rows.append(("RSS growth over the soak", growth, "<=", 0.05, failures(r, "soak")))
    return [{"target": name, **judge(values, op, bound, judged=judged, problems=problems,
                                     pooled=pooled.get(name))}
            for name, values, op, bound, problems in rows]


def cluster_targets(r: dict[str, Any]) -> list[tuple[str, list[float], str, float, list[str]]]:
    """The Redis Cluster phases (bench/cluster.py), when they ran: the cluster's worker
    CPU per order against the single Redis's with 100 sales, and the cost target of
    1,000 sales against 1 sale, on the cluster."""
    if "cluster_100" not in r and "cluster_scale_1000" not in r:
        return []

    def problems(*keys: str) -> list[str]:
        return failures(r, *keys) + [p for k in keys for p in tick_problems(r, k, ("workers",))]
    cpu = "cpu_us_per_order"
    return [
        ("Redis Cluster / single Redis, worker CPU per order (100 sales)",
         paired(field(r, "cluster_100", cpu), field(r, "cluster_single_100", cpu)), "<=", 1.5,
         problems("cluster_100", "cluster_single_100")),
        ("Redis Cluster: CPU per order, 1000 sales / 1 sale",
         paired(field(r, "cluster_scale_1000", cpu), field(r, "cluster_scale_1", cpu)), "<=",
         1.5, problems("cluster_scale_1", "cluster_scale_1000")),
    ]


# the suite's tracing phases (bench/tracebench.py): key, what, figure, ticks group, and
# what the figure is per
TRACE_PHASES = (("trace_engine", "worker CPU per order", "cpu_us_per_order", "workers",
                 "processed"),
                ("trace_http", "BFF CPU per accepted purchase", "cpu_us_per_accepted", None,
                 "accepted"))
TRACE_BOUNDS = (("0", TRACE_OFF_BOUND), ("0.01", TRACE_ONE_PERCENT_BOUND))
TRACE_LABELS = {"untraced": "untraced build", "0": "trace_sample 0", "0.01": "trace_sample 0.01",
                "1": "trace_sample 1"}


def trace_targets(r: dict[str, Any]) -> list[tuple[str, list[float], str, float, list[str]]]:
    """Issue 25, when its phases ran: trace_sample 0 and 0.01 against the untraced build
    of the same round, per order in the engine and per purchase at the BFF."""
    rows = []
    for key, what, figure, ticks, _ in TRACE_PHASES:
        if key not in r:
            continue
        for variant, bound in TRACE_BOUNDS:
            ratios, problems = trace_ratios(runs_of(r, key), variant, figure, ticks)
            rows.append((_trace_target(what, variant), ratios, "<=", bound, problems))
    return rows


def _trace_target(what: str, variant: str) -> str:
    return f"tracing: {what}, {TRACE_LABELS[variant]} / untraced build"


def trace_pooled(r: dict[str, Any]) -> list[tuple[str, float]]:
    """The tracing targets' ratios with all runs pooled (verdicts.pooled_trace_ratio):
    what they are judged on."""
    out = []
    for key, what, figure, _, count in TRACE_PHASES:
        for variant, _ in TRACE_BOUNDS:
            ratio = pooled_trace_ratio(runs_of(r, key), variant, figure, count) \
                if key in r else None
            if ratio is not None:
                out.append((_trace_target(what, variant), ratio))
    return out


def _trace_table(r: dict[str, Any]) -> list[str]:
    """Each variant's figure and its ratio to the untraced build (100% included)."""
    phases = [p for p in TRACE_PHASES if p[0] in r]
    if not phases:
        return []
    head = " | ".join(f"{what}, us | / untraced (all runs pooled)"
                      for _, what, *_ in phases)
    lines = ["", f"| tracing (median (min-max) of runs) | {head} |",
             "|---|" + "---:|---:|" * len(phases)]
    for variant, label in TRACE_LABELS.items():
        cells = []
        for key, _, figure, _ticks, count in phases:
            runs = runs_of(r, key)
            values = [run.get("variants", {}).get(variant, {}) for run in runs]
            own = [None if v.get("failed") or figure not in v else float(v[figure])
                   for v in values]
            why = next((v["failed"] for v in values if v.get("failed")), None)
            base = [(trace_sides(run, variant)[0] or {}).get(figure) for run in runs]
            # (every round's ratio, judged or not: a quick run's too)
            ratios = [o / b for o, b in zip(own, base, strict=True) if o is not None and b
                      ] if variant != "untraced" else []
            pooled = pooled_trace_ratio(runs, variant, figure, count) \
                if variant != "untraced" else None
            cells += [_spread_cell(own, ".1f") if any(x is not None for x in own)
                      else (why or ""), (_spread_cell(list(ratios), ".3f") if ratios else "")
                      + (f" ({pooled:.3f})" if pooled is not None else "")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    commit = next((run.get("untraced_commit") for key, *_ in phases
                   for run in runs_of(r, key) if run.get("untraced_commit")), None)
    lines += ["", f"The untraced build: {commit or 'none'}; trace_sample 1 is reported, "
              "not judged."]
    return lines


def _over_broker(runs: list[dict[str, Any]]) -> tuple[list[float], str, float, list[str]]:
    ratios, problems = p99_over_broker(runs)
    return ratios, "<=", P99_OVER_BROKER_BOUND, problems


def _present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _spread_cell(values: list[float | None], fmt: str = ",.0f") -> str:
    """'median (min-max)' of the runs that have the figure; the median alone for one."""
    s = spread(_present(values))
    if s is None:
        return ""
    if s.runs == 1:
        return format(s.median, fmt)
    return f"{s.median:{fmt}} ({s.low:{fmt}}-{s.high:{fmt}})"


def _median(runs: list[dict[str, Any]], *path: str) -> float | None:
    vals = []
    for run in runs:
        x: Any = run
        for part in path:
            x = x.get(part) if isinstance(x, dict) else None
        if x is not None and not run.get("failed"):
            vals.append(float(x))
    s = spread(vals)
    return s.median if s else None


def _status(runs: list[dict[str, Any]]) -> str:
    failed = [f"run {i + 1}: {run['failed']}" for i, run in enumerate(runs) if run.get("failed")]
    return "FAILED " + "; ".join(failed) if failed else "ok"


LABELS = [
    ("ceiling_redis", "ceiling: XREADGROUP + XACK"),
    ("ceiling_publish_plain", "ceiling: aiormq basic_publish, confirms, window 500"),
    ("ceiling_publish_batched", "ceiling: engine publisher alone (framed batches)"),
    ("ceiling_copy", "ceiling: COPY into a copy of seckill_logs"),
    ("naive", "naive: the seed's loop, one order at a time"),
    ("engine_1w", "engine, 1 worker"),
    ("engine_2w", "engine, 2 workers"),
    ("scale_1", "scale: 1 open sale, 2 workers"),
    ("scale_100", "scale: 100 open sales, 2 workers"),
    ("scale_1000", "scale: 1,000 open sales, 2 workers"),
    ("soak", "soak, 2 workers"),
    ("cluster_single_100", "single Redis (cluster phase): 100 sales, 2 workers"),
    ("cluster_100", "Redis Cluster, 3 masters: 100 sales, 2 workers"),
    ("cluster_scale_1", "Redis Cluster: 1 sale, 2 workers"),
    ("cluster_scale_1000", "Redis Cluster: 1,000 sales, 2 workers"),
]
GROUPS = ("workers", *SERVICES)


def markdown(doc: dict[str, Any]) -> str:
    r, m = doc["results"], doc["machine"]
    judged = doc["mode"] != "quick"
    lines = [
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB; Python "
        f"{m['python']}, Redis {m['redis']}, RabbitMQ {m['rabbitmq']} "
        f"({r.get('queue_type', '?')} queue), PostgreSQL {m['postgresql']}. Mode: {doc['mode']}"
        f", {doc.get('rounds', 1)} round(s), {doc.get('seconds', 0) / 60:.1f} min."
        + ("" if judged else " Targets not judged (quick run)."),
        "",
        "Engine rows count orders whose row is committed and whose event reached the tap "
        "queue, from the first read to the last acknowledgement; figures are the median "
        "(min-max) over the runs; CPU is over the ticks shown (1 tick = "
        f"{1000 // max(1, _tick_hz(r))} ms).",
        "",
        "| measurement | runs | orders | orders/s | CPU us/order | CPU ticks | peak RSS MB "
        "| dead letters | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, label in LABELS:
        runs = runs_of(r, key)
        if not runs:
            continue
        orders = _median(runs, "processed") or _median(runs, "orders") or 0
        cpu = _spread_cell(field(r, key, "cpu_us_per_order"), ".1f")
        ticks = _median(runs, "ticks", "workers") if "engine" in key or "scale" in key \
            or key == "soak" or key.startswith("cluster") else None
        rss = _median(runs, "peak_rss_mb")
        dead = _median(runs, "dead_letters")
        lines.append(f"| {label} | {len(runs)} | {orders:,.0f} | "
                     f"{_spread_cell(field(r, key, 'per_second'))} | {cpu} | "
                     f"{'' if ticks is None else f'{ticks:,.0f}'} | "
                     f"{'' if rss is None else f'{rss:.0f}'} | "
                     f"{'' if dead is None else f'{dead:,.0f}'} | {_status(runs)} |")
    lines += _cores_table(r, m["cores"])
    lines += _limit_table(r, m["cores"])
    if "soak" in r:
        for i, soak in enumerate(runs_of(r, "soak")):
            if not soak.get("failed"):
                lines += ["", f"Soak run {i + 1}: worker RSS {soak['rss_start_mb']:.1f} MB at "
                          f"the start, {soak['rss_end_mb']:.1f} MB at the end, "
                          f"{soak['seconds']:.0f} s."]
    q = runs_of(r, "queue_types")
    if q and not q[0].get("failed"):
        lines += ["", "| publish with confirms (engine publisher) | orders/s |", "|---|---:|"]
        for kind in ("quorum", "classic"):
            lines.append(f"| {kind} durable queue | {q[0][kind]['per_second']:,.0f} |")
    lines += _latency_tables(r)
    lines += _bff_table(r)
    lines += _cluster_table(r)
    lines += _trace_table(r)
    lines += ["", "A target is met only when every run is on the right side of its bound.", "",
              "| target | median | spread (min-max) | runs | bound | met |",
              "|---|---:|---:|---:|---:|---|"]
    for t in doc["targets"]:
        med = f"{t['median']:.2f}" if "median" in t else ""
        rng = f"{t['min']:.2f}-{t['max']:.2f}" if "min" in t else ""
        lines.append(f"| {t['target']} | {med} | {rng} | {t['runs']} | {t['op']} {t['bound']} "
                     f"| {t['verdict']} |")
    return "\n".join(lines) + "\n"


def _tick_hz(r: dict[str, Any]) -> int:
    for key, _ in LABELS:
        for run in runs_of(r, key):
            if "tick_hz" in run:
                return int(run["tick_hz"])
    return 100


def _cores_table(r: dict[str, Any], cores: int) -> list[str]:
    """Busy cores per group in each phase (median over runs), with the ticks behind them."""
    lines = ["", f"| where the cores went (of {cores}), median | window s | our processes | "
             "RabbitMQ | PostgreSQL | Redis | all | rest of the machine | ticks: ours / RabbitMQ "
             "/ PostgreSQL / Redis |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in LABELS:
        runs = [run for run in runs_of(r, key) if "cores_busy" in run]
        if not runs:
            continue
        busy = {g: _median(runs, "cores_busy", g) or 0.0 for g in GROUPS}
        ticks = " / ".join(f"{_median(runs, 'ticks', g) or 0:,.0f}" for g in GROUPS)
        lines.append(f"| {label} | {_median(runs, 'seconds') or 0:.1f} | "
                     + " | ".join(f"{busy[g]:.2f}" for g in GROUPS)
                     + f" | {sum(busy.values()):.2f} | "
                     f"{_median(runs, 'cores_busy', 'other') or 0.0:.2f} | {ticks} |")
    return lines


def _limit_table(r: dict[str, Any], cores: int) -> list[str]:
    """CPU per order of each group: alone in the ceilings (the machine limit) and in the
    2-worker engine, and the bound each mix of costs puts on orders/s."""
    alone = {svc: _median(runs_of(r, key), "cpu_us", svc) for key, svc in LIMIT_SOURCES}
    e2 = runs_of(r, "engine_2w")
    engine = {g: _median(e2, "cpu_us", g) for g in GROUPS}
    if any(v is None for v in alone.values()) or any(v is None for v in engine.values()):
        return ["", "Machine limit: not measured (a ceiling or engine run failed)."]
    workers = engine["workers"] or 0.0

    def bound(us: float) -> str:
        return f"{cores / (us / 1e6):,.0f}" if us else ""

    services_alone = sum(alone.values())  # type: ignore[arg-type]
    services_engine = sum(engine[s] for s in SERVICES)  # type: ignore[misc]

    def cell(figures: dict[str, float | None], group: str) -> str:
        value = figures.get(group)
        return "-" if value is None else f"{value:.1f}"

    lines = ["", "| CPU per order, us (median) | workers | RabbitMQ | PostgreSQL | Redis "
             f"| orders/s bound: {cores} cores / CPU per order |", "|---|---:|---:|---:|---:|---:|",
             "| each service alone in its ceiling: the machine limit | - | "
             + " | ".join(cell(alone, s) for s in SERVICES) + f" | {bound(services_alone)} |",
             "| the machine limit plus the workers' own CPU | "
             f"{workers:.1f} | " + " | ".join(cell(alone, s) for s in SERVICES)
             + f" | {bound(services_alone + workers)} |",
             "| engine, 2 workers: services only | - | "
             + " | ".join(cell(engine, s) for s in SERVICES) + f" | {bound(services_engine)} |",
             "| engine, 2 workers: services and workers | "
             f"{workers:.1f} | " + " | ".join(cell(engine, s) for s in SERVICES)
             + f" | {bound(services_engine + workers)} |"]
    measured = _median(e2, "per_second") or 0.0
    limit = cores / (services_alone / 1e6)
    with_workers = cores / ((services_alone + workers) / 1e6)
    lines += ["", f"Machine limit {limit:,.0f} orders/s; the engine measured {measured:,.0f} "
              f"({measured / limit:.2f} of it). The workers' own {workers:.1f} us per order "
              f"alone bring the bound to {with_workers:,.0f} ({with_workers / limit:.2f} of the "
              "limit): that much of the gap is ours."]
    return lines


def _latency_tables(r: dict[str, Any]) -> list[str]:
    lines = ["", "| latency (entry created -> acknowledged) | runs | orders/s | p50 ms | p95 ms |"
             " p99 ms | max ms | broker alone: p99 ms | ours / broker p99 | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key in ("latency_50", "latency_90"):
        runs = runs_of(r, key)
        if not runs:
            continue
        top = _median(runs, "max_le_ms")
        lines.append(f"| {key[-2:]}% of capacity | {len(runs)} | "
                     f"{_spread_cell(field(r, key, 'rate'))} | "
                     f"{_spread_cell(field(r, key, 'p50_ms'), '.1f')} | "
                     f"{_spread_cell(field(r, key, 'p95_ms'), '.1f')} | "
                     f"{_spread_cell(field(r, key, 'p99_ms'), '.1f')} | "
                     f"{'' if top is None else f'<= {top:.0f}'} | "
                     f"{_spread_cell(field(r, key, 'broker_p99_ms'), '.1f')} | "
                     f"{_spread_cell(list(p99_over_broker(runs)[0]), '.2f')} | "
                     f"{_status(runs)} |")
    staged = [(key, runs_of(r, key)) for key in ("latency_50", "latency_90")]
    if any(_median(runs, "stages", "log", "batches") for _, runs in staged):
        lines += ["", "| time per batch in each stage, p50 / p99 ms (median of runs) | batches "
                  "| prepare | log | publish | ack |", "|---|---:|---:|---:|---:|---:|"]
        for key, runs in staged:
            cells = []
            for stage in ("prepare", "log", "publish", "ack"):
                p50 = _median(runs, "stages", stage, "p50_ms")
                p99 = _median(runs, "stages", stage, "p99_ms")
                cells.append("" if p50 is None or p99 is None else f"{p50:.1f} / {p99:.1f}")
            batches = _median(runs, "stages", "log", "batches") or 0
            lines.append(f"| {key[-2:]}% of capacity | {batches:,.0f} | {' | '.join(cells)} |")
    return lines


def _cluster_table(r: dict[str, Any]) -> list[str]:
    """Redis Cluster against the single Redis, 100 sales, paired by round."""
    if "cluster_100" not in r:
        return []
    rows = [("orders/s", "per_second"), ("worker CPU us per order", "cpu_us_per_order")]
    lines = ["", "| Redis Cluster / single Redis, 100 sales, same round (median (min-max)) "
             "| ratio |", "|---|---:|"]
    for label, name in rows:
        ratios = paired(field(r, "cluster_100", name), field(r, "cluster_single_100", name))
        lines.append(f"| {label} | {_spread_cell(list(ratios), '.2f')} |")
    return lines


def _bff_table(r: dict[str, Any]) -> list[str]:
    """The HTTP phase: the direct gate, the floor, the BFF with warm and with new tokens,
    and the CPU target's figure per round."""
    runs = [run for run in runs_of(r, "bff") if not run.get("failed")]
    if not runs_of(r, "bff"):
        return []
    lines = ["", "| gate, 64 connections (median (min-max) of runs) | runs | accepted/s | p50 ms "
             "| p99 ms | server CPU us/request | us/accepted | ticks | tokens verified |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if not runs:
        return lines + [f"| HTTP gate | {len(runs_of(r, 'bff'))} | {_status(runs_of(r, 'bff'))} "
                        "| | | | | | |"]
    b = runs[0]
    workers, client = b["bff_workers"], b.get("client", "python")
    labels = (("gate_direct", f"Lua gate called from Python "
                              f"({b['gate_direct'].get('processes', 1)} processes)"),
              ("floor", f"HTTP floor: Granian {b['floor'].get('interface', 'asgi').upper()}, "
                        f"fixed 202 ({workers} workers; client {client})"),
              ("bff", f"HTTP gate, JWT on, tokens verified once ({workers} workers)"),
              ("bff_cold", "HTTP gate, JWT on, every token new (the cold cost)"))
    for key, label in labels:
        if not all(key in run for run in runs):
            continue

        def col(name: str, fmt: str, key: str = key) -> str:
            return _spread_cell([run[key].get(name) for run in runs], fmt)
        lines.append(f"| {label} | {len(runs)} | {col('accepted_per_second', ',.0f')} | "
                     f"{col('p50_ms', '.1f')} | {col('p99_ms', '.1f')} | "
                     f"{col('cpu_us_per_request', '.1f')} | {col('cpu_us_per_accepted', '.1f')} "
                     f"| {col('ticks', ',.0f')} | {col('token_verifications', ',.0f')} |")
    for i, run in enumerate(runs_of(r, "bff")):
        if run.get("failed") or "cpu_ratio" not in run:
            continue
        base = run["floor"]["cpu_us_per_request"] + run["gate_direct"]["cpu_us_per_request"]
        cold = run["bff_cold"]["cpu_us_per_request"] - run["bff"]["cpu_us_per_request"]
        lines.append("")
        lines.append(f"Run {i + 1}: BFF {run['bff']['cpu_us_per_accepted']:.1f} us per accepted "
                     f"purchase / ({run['floor'].get('interface', 'asgi').upper()} floor "
                     f"{run['floor']['cpu_us_per_request']:.1f} + direct gate "
                     f"{run['gate_direct']['cpu_us_per_request']:.1f} = {base:.1f} us) = "
                     f"{run['cpu_ratio']:.2f} (target <= {HTTP_CPU_BOUND}; "
                     f"{run.get('slices', 1)} alternating windows per server); the BFF's own "
                     f"{run['bff']['cpu_us_per_accepted'] - base:.1f} us; a new token costs "
                     f"{cold:.0f} us more.")
    return lines


def plots(doc: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Throughput by stage and worker count; latency CDF."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    r = doc["results"]
    keys = ["ceiling_redis", "ceiling_publish_plain", "ceiling_publish_batched", "ceiling_copy",
            "naive", "engine_1w", "engine_2w"]
    names = ["Redis\nread+ack", "publish\n(aiormq)", "publish\n(framed)", "COPY", "naive",
             "engine\n1 worker", "engine\n2 workers"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    values = [_median(runs_of(r, k), "per_second") or 0.0 for k in keys]
    bars = ax.bar(names, values, color=["#999"] * 4 + ["#c44", "#48c", "#26a"])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("orders per second")
    ax.set_title("Throughput (median of runs): component ceilings, the naive loop, the engine")
    fig.tight_layout()
    paths = [out / f"{stem}-throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("latency_50", "50% load"), ("latency_90", "90% load")):
        done = [run for run in runs_of(r, key) if run.get("cdf")]
        if not done:
            continue
        cdf, total = done[0]["cdf"], done[0]["count"] or 1  # the first run's
        ax.step([b * 1000 for b, _ in cdf], [c / total for _, c in cdf], where="post",
                label=label)
    ax.set_xscale("log")
    ax.set_xlabel("entry created -> acknowledged (ms, log scale)")
    ax.set_ylabel("share of orders")
    ax.set_title("Latency CDF (engine histogram buckets, first run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / f"{stem}-latency.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
