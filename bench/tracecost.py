"""`python -m bench.tracecost`: what tracing costs per purchase and per order, in-process.

The end-to-end A/B (`python -m bench.abtest`, a BFF with `SECKILL_TRACE_SAMPLE` against
one without) measures the whole; this prices each piece on its own, in CPU time of
the process (the export thread's serialization included: spans go through the OTLP
protobuf encoder, only the HTTP request is left out), so the figures add up:

- off (`trace_sample` 0): the hot paths check `tracing is None` (BFF: not even that,
  its route table holds the untraced handler), so there is nothing to time but that;
- on, the order not sampled: the BFF draws a random number per attempt, the engine
  looks each entry up for the stream field once per batch;
- a sampled purchase at the BFF: its server span (a record, Tracing.served), the
  stream field;
- a sampled order in the engine: its own span, and the batch's spans, paid once by
  each batch that holds a sampled order (built at the batch's end as records, encoded
  by engine.tracewire in the export thread).

The BFF's cost at ratio r is `draw + r * sampled`; the engine's is a batch as it comes
at r (at 1% of 1,000 entries, ten sampled) over its orders, measured whole. Against
the worker's CPU per order and the BFF's per accepted purchase (docs/performance.md)
they give the share tracing adds. Writes bench/results/tracecost-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.keys import Keys
from engine.pipeline.orders import Entry, decode_batch
from engine.pipeline.ordertrace import BatchTrace, sampled_parents
from engine.tracing import STREAM_FIELD, Tracing

from .resultfiles import write_result

# the baselines the shares are taken of (docs/performance.md, the latest full run)
WORKER_US_PER_ORDER = 18.0
BFF_US_PER_PURCHASE = 70.0
RATIOS = (0.0, 0.01, 1.0)
KEYS = Keys("tracecost:")


class EncodingExporter:
    """The OTLP exporter's CPU work without its HTTP request: spans to protobuf bytes
    (the SDK's spans by its encoder, the engine's records already encoded by ours)."""

    def __init__(self) -> None:
        self.bytes = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.bytes += len(encode_spans(spans).SerializePartialToString())
        return SpanExportResult.SUCCESS

    def export_encoded(self, data: bytes, spans: int) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.bytes += len(data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def cpu_us(work: Callable[[], None], repeat: int, tracing: Tracing | None = None) -> float:
    """CPU microseconds per call of `work`, the export of what it made included."""
    work()  # warm
    if tracing is not None:
        tracing.flush()
    start = time.process_time()
    for _ in range(repeat):
        work()
    if tracing is not None:
        tracing.flush()
    return (time.process_time() - start) / repeat * 1e6


def entries(n: int, sampled: int, tracing: Tracing) -> list[Entry]:
    """A batch of `n` entries as the gate writes them, the first `sampled` with a context."""
    out = []
    now = int(time.time() * 1000)
    for i in range(n):
        fields = {b"uid": str(i + 1).encode(), b"ts": b"1765000000", b"sale": b"19a-ab",
                  b"slot": str(i + 1).encode()}
        if i < sampled:
            span = tracing.start("purchase", kind="server")
            fields[STREAM_FIELD] = tracing.stream_value(span).encode()
            span.end()
        out.append(Entry(KEYS.stream(1).encode(), f"{now}-{i}", fields))
    return out


def measure(batch: int, repeat: int) -> dict[str, float]:
    exporter = EncodingExporter()
    tracing = Tracing.create(exporter, "tracecost", ratio=0.0, queue=1 << 20,
                             count=lambda what, n: None)
    plain = entries(batch, 0, tracing)
    tracing.flush()
    out: dict[str, float] = {}
    off: Any = None
    out["off_check_ns"] = cpu_us(lambda: off is not None, repeat * 100) * 1000
    out["edge_draw_ns"] = cpu_us(lambda: tracing.sampled(None), repeat * 100) * 1000
    # the engine looks only where the decode (which it does anyway) found an entry other
    # than the gate's common one: none in a batch without a sampled order
    plain_others: list[int] = []
    decode_batch(plain, KEYS, 1 << 16, plain_others)
    out["engine_scan_ns_per_order"] = cpu_us(
        lambda: plain_others and sampled_parents(tracing, plain, plain_others),
        repeat) * 1000 / batch

    def purchase() -> None:  # (as the BFF's _traced_buy: a record span, Tracing.served)
        attributes: dict[str, Any] = {"url.path": "/api/v1/seckill/1"}
        with tracing.served("POST /api/v1/seckill/{product_id}", None, attributes) as span:
            span.stream_value()
            attributes["http.response.status_code"] = 202
    out["bff_sampled_us"] = cpu_us(purchase, repeat, tracing)
    # the SDK's floor: one bare span, started, ended and encoded (what a hop pays at least
    # per span it makes with the SDK; the BFF and the engine make none)
    out["sdk_span_us"] = cpu_us(lambda: tracing.start("bare").end(), repeat, tracing)

    def order_batch(batch_entries: list) -> Callable[[], None]:
        # each stage is handed the batch's orders, as the pipeline hands them
        others: list[int] = []
        orders = decode_batch(batch_entries, KEYS, 1 << 16, others)[0]
        assert len(orders) == batch

        def run() -> None:
            parents = sampled_parents(tracing, batch_entries, others)
            assert parents is not None
            trace = BatchTrace(tracing, parents, batch)
            for stage, event in (("log", "logged"), ("publish", "published"),
                                 ("ack", "acked")):
                with trace.stage(stage, event, orders):
                    if stage == "publish":
                        trace.headers(orders)
            trace.end()
        return run
    # a batch as it comes at each ratio (1% of 1,000: ten sampled orders), all included:
    # the scan, the spans made at its end, their encoding in the export thread
    for ratio in RATIOS[1:]:
        n = max(1, round(batch * ratio))
        out[f"engine_batch_us_at_{ratio:g}"] = cpu_us(
            order_batch(entries(batch, n, tracing)), max(10, repeat * 10 // (10 + n)), tracing)
    n1 = max(1, round(batch * RATIOS[1]))
    out["engine_sampled_us_per_order"] = (out["engine_batch_us_at_1"]
                                          - out["engine_batch_us_at_0.01"]) / (batch - n1)
    out["engine_batch_spans_us"] = (out["engine_batch_us_at_0.01"]
                                    - out["engine_scan_ns_per_order"] * batch / 1000
                                    - n1 * out["engine_sampled_us_per_order"])
    tracing.close()
    return out


def shares(m: dict[str, float], batch: int) -> list[dict[str, Any]]:
    """Added CPU per purchase (BFF) and per order (engine) at each ratio: the engine's,
    a batch at that ratio over its orders."""
    rows = []
    for r in RATIOS:
        if r == 0:
            bff = engine = 0.0
        else:
            bff = m["edge_draw_ns"] / 1000 + r * m["bff_sampled_us"]
            engine = m[f"engine_batch_us_at_{r:g}"] / batch
        rows.append({"ratio": r, "bff_us": bff, "bff_share": bff / BFF_US_PER_PURCHASE,
                     "engine_us": engine, "engine_share": engine / WORKER_US_PER_ORDER})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracecost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=250, help="entries per engine batch")
    p.add_argument("--repeat", type=int, default=2000)
    args = p.parse_args(argv)
    m = measure(args.batch, args.repeat)
    rows = shares(m, args.batch)
    lines = [
        f"off: `tracing is None` {m['off_check_ns']:.0f} ns; on, unsampled: edge draw "
        f"{m['edge_draw_ns']:.0f} ns per attempt, engine scan "
        f"{m['engine_scan_ns_per_order']:.0f} ns per order (batches of {args.batch})",
        f"sampled: BFF {m['bff_sampled_us']:.1f} us per purchase; engine, a batch at 1% "
        f"{m['engine_batch_us_at_0.01']:.0f} us, at 100% {m['engine_batch_us_at_1']:.0f} us: "
        f"{m['engine_sampled_us_per_order']:.1f} us per sampled order, and "
        f"{m['engine_batch_spans_us']:.1f} us per batch holding one (its own spans)",
        f"the SDK's floor: one bare span started, ended and encoded {m['sdk_span_us']:.1f} us "
        "(the Resource Domain's and the status consumer's spans; the BFF's and the engine's "
        "are records, encoded by engine.tracewire)",
        "", "| trace_sample | BFF us/purchase | share of "
        f"{BFF_US_PER_PURCHASE:g} us | engine us/order | share of {WORKER_US_PER_ORDER:g} us |",
        "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['ratio']:g} | {row['bff_us']:.2f} | {row['bff_share']:.1%} | "
                     f"{row['engine_us']:.2f} | {row['engine_share']:.1%} |")
    text = "\n".join(lines)
    print(text)
    path = write_result("tracecost", {"batch": args.batch, "repeat": args.repeat,
                                      "measured": m, "shares": rows}, text)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
