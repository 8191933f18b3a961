"""Prometheus objects of span export (engine.tracing), in whichever process traces.

Imported by `engine.tracing.setup` only when tracing is on, so a process that does not
trace registers nothing of it.
"""

from __future__ import annotations

from prometheus_client import Counter

SPANS_EXPORTED = Counter("seckill_trace_spans_exported_total",
                         "Finished spans the OTLP collector accepted.")
SPANS_DROPPED = Counter("seckill_trace_spans_dropped_total",
                        "Finished spans never exported: the export queue was full "
                        "(queue_full) or the collector refused or missed them "
                        "(export_failed).", ["reason"])
