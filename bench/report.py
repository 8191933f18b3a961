"""The suite's human outputs: the targets as ratios, a markdown table, and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark issue, measured against this run's own baselines."""
    ceiling_publish = max(r["ceiling_publish_plain"]["per_second"],
                          r["ceiling_publish_batched"]["per_second"])
    e2 = r["engine_2w"]
    rows = [
        ("engine (2 workers) / naive", e2["per_second"] / r["naive"]["per_second"], ">=", 12.0),
        ("engine (2 workers) / publish-with-confirms ceiling", e2["per_second"] / ceiling_publish,
         ">=", 0.9),
        ("worker CPU per order, us (2 workers)", e2["cpu_us_per_order"], "<=", 45.0),
        ("p99 at 50% load, ms", r["latency_50"]["p99_ms"], "<=", 25.0),
        ("p99 at 90% load, ms", r["latency_90"]["p99_ms"], "<=", 100.0),
        ("CPU per order, 1000 sales / 1 sale",
         r["scale_1000"]["cpu_us_per_order"] / r["scale_1"]["cpu_us_per_order"], "<=", 1.5),
        ("peak RSS per worker, MB", max(e2["peak_rss_mb"], r["engine_1w"]["peak_rss_mb"]),
         "<=", 80.0),
    ]
    if "bff" in r:
        rows.append(("HTTP gate / direct gate, accepted/s", r["bff"]["ratio"], ">=", 0.8))
        rows.append(("HTTP gate p99 at 64 connections, ms", r["bff"]["bff"]["p99_ms"], "<=",
                     20.0))
    if "soak" in r:
        soak = r["soak"]
        growth = soak["rss_end_mb"] / soak["rss_start_mb"] - 1 if soak["rss_start_mb"] else 0
        rows.append(("RSS growth over the soak", growth, "<=", 0.05))
    out = []
    for name, value, op, bound in rows:
        met = value >= bound if op == ">=" else value <= bound
        out.append({"target": name, "value": value, "op": op, "bound": bound, "met": met})
    return out


def markdown(doc: dict[str, Any]) -> str:
    r, m = doc["results"], doc["machine"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB; Python "
        f"{m['python']}, Redis {m['redis']}, RabbitMQ {m['rabbitmq']} "
        f"({r.get('queue_type', '?')} queue), PostgreSQL {m['postgresql']}. Mode: {doc['mode']}.",
        "",
        "| measurement | orders | orders/s | CPU us/order | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = [
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
    ]
    for key, label in labels:
        if key not in r:
            continue
        x = r[key]
        cpu = f"{x['cpu_us_per_order']:.1f}" if "cpu_us_per_order" in x else ""
        rss = f"{x['peak_rss_mb']:.0f}" if "peak_rss_mb" in x else ""
        lines.append(f"| {label} | {x['orders']:,} | {x['per_second']:,.0f} | {cpu} | {rss} |")
    busy = [(label, r[key]) for key, label in labels if "cores_busy" in r.get(key, {})]
    if busy:
        lines += ["", f"| where the cores went (of {m['cores']}) | our processes | RabbitMQ | "
                  "PostgreSQL | Redis | all |", "|---|---:|---:|---:|---:|---:|"]
        for label, x in busy:
            c = x["cores_busy"]
            lines.append(f"| {label} | {c['workers']:.2f} | {c['rabbitmq']:.2f} | "
                         f"{c['postgresql']:.2f} | {c['redis']:.2f} | {sum(c.values()):.2f} |")
    if "soak" in r:
        soak = r["soak"]
        lines += ["", f"Soak: worker RSS {soak['rss_start_mb']:.1f} MB at the start, "
                  f"{soak['rss_end_mb']:.1f} MB at the end, {soak['seconds']:.0f} s."]
    if "queue_types" in r:
        q = r["queue_types"]
        lines += ["", "| publish with confirms (engine publisher) | orders/s |", "|---|---:|"]
        for kind in ("quorum", "classic"):
            lines.append(f"| {kind} durable queue | {q[kind]['per_second']:,.0f} |")
    lines += ["", "| latency (entry created -> acknowledged) | orders/s | p50 ms | p95 ms |"
              " p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
    for key in ("latency_50", "latency_90"):
        x = r[key]
        lines.append(f"| {key[-2:]}% of capacity | {x['rate']:,.0f} | {x['p50_ms']:.1f} | "
                     f"{x['p95_ms']:.1f} | {x['p99_ms']:.1f} | <= {x['max_le_ms']:.0f} |")
    if "stages" in r["latency_50"]:
        lines += ["", "| time per batch in each stage, p50 / p99 ms | batches | prepare | log "
                  "| publish | ack |", "|---|---:|---:|---:|---:|---:|"]
        for key in ("latency_50", "latency_90"):
            st = r[key]["stages"]
            cells = [f"{st[s]['p50_ms']:.1f} / {st[s]['p99_ms']:.1f}" if s in st else ""
                     for s in ("prepare", "log", "publish", "ack")]
            batches = st.get("log", {}).get("batches", 0)
            lines.append(f"| {key[-2:]}% of capacity | {batches:,.0f} | {' | '.join(cells)} |")
    if "bff" in r:
        lines += ["", "| gate, 64 connections | accepted/s | p50 ms | p99 ms "
                  "| server CPU us/request |", "|---|---:|---:|---:|---:|"]
        b = r["bff"]
        direct = f"Lua gate called from Python ({b['gate_direct'].get('processes', 1)} processes)"
        http = (f"HTTP gate (Granian, {b['bff_workers']} workers; "
                f"client {b.get('client', 'python')})")
        for key, label in (("gate_direct", direct), ("bff", http)):
            x = r["bff"][key]
            cpu = f"{x['cpu_us_per_request']:.0f}" if "cpu_us_per_request" in x else ""
            lines.append(f"| {label} | {x['accepted_per_second']:,.0f} | {x['p50_ms']:.1f} | "
                         f"{x['p99_ms']:.1f} | {cpu} |")
    lines += ["", "| target | measured | bound | met |", "|---|---:|---:|:---:|"]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['op']} {t['bound']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


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
    values = [r[k]["per_second"] for k in keys]
    bars = ax.bar(names, values, color=["#999"] * 4 + ["#c44", "#48c", "#26a"])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("orders per second")
    ax.set_title("Throughput: component ceilings, the naive loop and the engine")
    fig.tight_layout()
    paths = [out / f"{stem}-throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("latency_50", "50% load"), ("latency_90", "90% load")):
        cdf = r[key]["cdf"]
        total = r[key]["count"] or 1
        ax.step([b * 1000 for b, _ in cdf], [c / total for _, c in cdf], where="post",
                label=label)
    ax.set_xscale("log")
    ax.set_xlabel("entry created -> acknowledged (ms, log scale)")
    ax.set_ylabel("share of orders")
    ax.set_title("Latency CDF (engine histogram buckets)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / f"{stem}-latency.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
