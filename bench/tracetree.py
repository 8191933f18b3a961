"""`python -m bench.tracetree SPANS.json OUT.png`: one trace's span tree as a picture.

SPANS.json is what tests/fulfilment/test_order_trace.py writes when
SECKILL_TRACE_DUMP names a file: the spans of one sampled order's trace, as the test's
OTLP receiver got them from the real processes. Each span is a bar on a time axis
(milliseconds from the trace's first span), indented under its parent, coloured by
the service that made it; an event is a tick on its span's bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = {"seckill-bff": "#4C72B0", "seckill-engine": "#DD8452",
           "seckill-resource-domain": "#55A868"}


def ordered(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) in tree order: each span after its parent, siblings by start."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in ids else ""
        children.setdefault(parent, []).append(s)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)
    walk("", 0)
    return out


def _label(depth: int, span: dict[str, Any]) -> str:
    """A tree row's label: indented under its parent, with the service that made it."""
    lead = "   " * (depth - 1) + "└─ " if depth else ""
    return f"{lead}{span['name']} ({span['service'].removeprefix('seckill-')})"


def render(spans: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(spans)
    t0 = min(s["start_ns"] for s in spans)
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.3))
    for y, (_, s) in enumerate(rows):
        start, end = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - t0) / 1e6
        ax.barh(y, max(end - start, 0.05), left=start, height=0.6,
                color=COLOURS.get(s["service"], "#8172B2"))
        for i, (name, at) in enumerate(s.get("events", [])):
            ax.plot([(at - t0) / 1e6] * 2, [y - 0.3, y + 0.3], color="black", lw=1)
            above = i % 2 == 0  # (alternately above and below: close events stay legible)
            ax.annotate(name, ((at - t0) / 1e6, y - 0.32 if above else y + 0.32),
                        fontsize=6, ha="center", va="bottom" if above else "top")
        ax.annotate(f"{end - start:.1f} ms", (end, y), xytext=(4, 0),
                    textcoords="offset points", fontsize=7, va="center")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_label(d, s) for d, s in rows], fontsize=8, family="monospace",
                       ha="left")
    ax.tick_params(axis="y", pad=max(len(_label(d, s)) for d, s in rows) * 5.2)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the purchase reached the BFF")
    ax.set_title(f"one sampled order's trace {spans[0]['trace_id']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracetree", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spans", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    render(json.loads(args.spans.read_text()), args.out)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
