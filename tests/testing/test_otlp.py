"""The tests' OTLP/HTTP collector decodes what an exporter sends, compressed or not,
and refuses what is not a traces request."""

from __future__ import annotations

import gzip

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from engine.testing.otlp import OtlpReceiver


def request() -> bytes:
    span = Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), parent_span_id=b"",
                name="purchase", kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=1,
                end_time_unix_nano=2,
                attributes=[KeyValue(key="n", value=AnyValue(int_value=3)),
                            KeyValue(key="tags", value=AnyValue(array_value=ArrayValue(
                                values=[AnyValue(string_value="a")])))],
                links=[Span.Link(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)],
                events=[Span.Event(name="read", time_unix_nano=5)])
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])
    resource.resource.attributes.append(KeyValue(key="service.name",
                                                 value=AnyValue(string_value="bff")))
    return ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString()


def test_a_request_is_decoded_plain_or_gzipped():
    with OtlpReceiver() as receiver:
        url = receiver.endpoint + "/v1/traces"
        headers = {"content-type": "application/x-protobuf"}
        assert httpx.post(url, content=request(), headers=headers).status_code == 200
        assert httpx.post(url, content=gzip.compress(request()),
                          headers={**headers, "content-encoding": "gzip"}).status_code == 200
        spans = receiver.wait(lambda s: len(s) == 2, 5, "two spans")
    span = spans[0]
    assert (span.service, span.name, span.kind) == ("bff", "purchase", "server")
    assert span.trace_id == bytes(range(16)).hex() and span.parent_id == ""
    assert span.attributes == {"n": 3, "tags": ["a"]}
    assert span.links == (("01" * 16, "02" * 8),)
    assert span.events == (("read", 5),)
    assert receiver.trace(span.trace_id) == spans


def test_anything_else_is_refused():
    with OtlpReceiver() as receiver:
        assert httpx.post(receiver.endpoint + "/v1/metrics", content=b"").status_code == 404
        assert httpx.post(receiver.endpoint + "/v1/traces",
                          content=b"\xff\xff\xff").status_code == 400
        assert receiver.spans() == []
