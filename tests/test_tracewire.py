"""engine.tracewire: a record encoded by hand is the very Span message the SDK's own
encoder makes of the same span, and a request of records decodes as a collector
decodes it."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from engine.testing.otlp import decode
from engine.tracewire import (
    CONSUMER,
    INTERNAL,
    SpanRecord,
    encode_request,
    encode_span,
    readable,
    resource_bytes,
    scope_bytes,
)

T = 0x0AF7651916CD43DD8448EB211C80319C
RECORDS = [
    SpanRecord("engine.order", CONSUMER, T, 0xB7AD6B7169203331, 0x00F067AA0BA902B7, True,
               "vendor=abc", 1_765_000_000_000_000_000, 1_765_000_000_500_000_000,
               {"seckill.entry_id": "1765000000000-0", "n": -3, "f": 0.5, "ok": True},
               [("read", 1_765_000_000_100_000_000), ("acked", 1_765_000_000_400_000_000)],
               (), "dead-lettered"),
    SpanRecord("engine.batch", CONSUMER, T + 1, 0x1111, 0, False, "", 5, 6,
               {"seckill.entries": 1000}, (), [(T, 0xB7AD6B7169203331), (T + 2, 7)]),
    SpanRecord("engine.log" + "x" * 200, INTERNAL, T + 1, 0x2222, 0x1111, False, "", 5, 6),
]


def test_a_record_encodes_as_the_sdk_encodes_its_span():
    resource = Resource.create({"service.name": "seckill-engine"})
    scope = InstrumentationScope("seckill")
    for record in RECORDS:
        theirs = encode_spans([readable(record, resource, scope)])
        expected = theirs.resource_spans[0].scope_spans[0].spans[0]
        assert Span.FromString(encode_span(record)) == expected


def test_a_request_of_records_decodes_with_its_resource():
    resource = Resource.create({"service.name": "seckill-engine", "list": ["a", "b"]})
    data = encode_request(RECORDS, resource_bytes(resource.attributes), scope_bytes("seckill"))
    request = ExportTraceServiceRequest.FromString(data)
    assert request.resource_spans[0].scope_spans[0].scope.name == "seckill"
    spans = decode(data)
    assert [s.service for s in spans] == ["seckill-engine"] * 3
    order, batch, log = spans
    assert (order.kind, order.parent_id, order.status) == ("consumer", "00f067aa0ba902b7", 2)
    assert order.attributes == {"seckill.entry_id": "1765000000000-0", "n": -3, "f": 0.5,
                                "ok": True}
    assert batch.links == ((f"{T:032x}", "b7ad6b7169203331"), (f"{T + 2:032x}", f"{7:016x}"))
    assert log.parent_id == batch.span_id and log.name.endswith("x" * 200)


def test_the_otlp_exporter_sends_records_and_sdk_spans_in_one_request():
    from engine.testing.otlp import OtlpReceiver
    from engine.tracing import TRACES_PATH, Tracing, otlp_exporter

    with OtlpReceiver() as receiver:
        exporter = otlp_exporter(receiver.endpoint + TRACES_PATH)
        assert hasattr(exporter, "export_encoded")  # (else records go as ReadableSpans)
        tracing = Tracing.create(exporter, "seckill-engine", count=lambda what, n: None)
        try:
            tracing.start("status.update").end()
            tracing.emit(RECORDS)
            assert tracing.flush()
        finally:
            tracing.close()
        spans = receiver.spans()
        assert receiver.requests == 1
    assert sorted(s.name for s in spans) == sorted(
        ["status.update", *(r.name for r in RECORDS)])
    assert {s.service for s in spans} == {"seckill-engine"}
