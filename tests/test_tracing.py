"""engine.tracing: off costs nothing, the carriers round-trip a context, the edge
samples as told, the export queue drops and counts instead of growing, and log lines
inside a sampled span name it."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from engine.config import Settings
from engine.errors import ConfigError
from engine.logs import JsonFormatter
from engine.testing.otlp import OtlpReceiver
from engine.tracing import STREAM_FIELD, Tracing, otlp_exporter, setup, span_context_of

ROOT = Path(__file__).resolve().parents[1]
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class Kept:
    """An exporter keeping what it is given (and blocking while `gate` is clear)."""

    def __init__(self) -> None:
        self.spans: list = []
        self.gate = threading.Event()
        self.gate.set()

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.gate.wait(10)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.gate.set()


@pytest.fixture
def tracing():
    t = Tracing.create(Kept(), "seckill-test", ratio=1.0)
    yield t
    t.close()


def test_sampling_zero_sets_up_nothing():
    """No SDK module is even imported: the disabled path is `tracing is None`."""
    code = ("import sys\nfrom engine.config import Settings\nfrom engine import tracing\n"
            "assert tracing.setup(Settings(), 'x') is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_settings_check_the_sample_and_the_endpoint():
    assert Settings(trace_endpoint="https://otel.example:4318").trace_endpoint
    with pytest.raises(ConfigError, match="trace_sample"):
        Settings(trace_sample=1.5)
    with pytest.raises(ConfigError, match="trace_endpoint"):
        Settings(trace_endpoint="otel.example:4318")


def test_a_stream_field_carries_the_context(tracing):
    span = tracing.start("purchase", kind="server")
    value = tracing.stream_value(span)
    assert len(value) == 55 and int(value[-2:], 16) & 1  # (the sampled flag; 2 = random ID)
    ctx = span_context_of(tracing.from_stream(value.encode()))
    assert (ctx.trace_id, ctx.span_id) == (span.get_span_context().trace_id,
                                           span.get_span_context().span_id)
    assert ctx.is_remote and ctx.trace_flags.sampled
    span.end()


def test_a_stream_field_keeps_the_tracestate(tracing):
    parent = tracing.http_parent(PARENT, "vendor=abc,other=1")
    span = tracing.start("purchase", parent)
    value = tracing.stream_value(span)
    assert value.split(" ", 1)[1] == "vendor=abc,other=1"
    assert span_context_of(tracing.from_stream(value)).trace_state.get("vendor") == "abc"
    span.end()


@pytest.mark.parametrize("value", [None, b"", b"junk", b"00-" + b"0" * 32 + b"-" + b"1" * 16
                                   + b"-01", PARENT[:-3].encode()])
def test_a_bad_or_missing_stream_field_is_no_context(tracing, value):
    assert tracing.from_stream(value) is None


def test_amqp_headers_carry_the_context_as_str_or_bytes(tracing):
    span = tracing.start("publish", tracing.http_parent(PARENT, "k=v"), kind="producer")
    headers = tracing.headers(span)
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert headers["tracestate"] == "k=v"
    as_bytes = {k: v.encode() for k, v in headers.items()}
    for carried in (headers, as_bytes):
        ctx = span_context_of(tracing.from_headers(carried))
        assert ctx.span_id == span.get_span_context().span_id
    assert tracing.from_headers(None) is None
    assert tracing.from_headers({"x-other": "1"}) is None
    span.end()


def test_the_edge_follows_a_trusted_parent_else_the_ratio(tracing):
    assert tracing.sampled(tracing.http_parent(PARENT, None))
    assert not tracing.sampled(tracing.http_parent(UNSAMPLED, None))
    tracing.ratio = 0.25
    draws = iter([0.1, 0.3])
    tracing._random = lambda: next(draws)
    assert tracing.sampled(None) and not tracing.sampled(None)
    assert tracing.http_parent(None, "k=v") is None
    assert tracing.http_parent("garbage", None) is None


def test_a_child_span_shares_the_trace_and_links_name_others(tracing):
    root = tracing.start("purchase", tracing.http_parent(PARENT, None))
    other = tracing.start("batch")
    child = tracing.start("log", tracing.from_stream(tracing.stream_value(root)),
                          links=[other.get_span_context()])
    for s in (child, other, root):
        s.end()
    tracing.flush()
    spans = {s.name: s for s in tracing.processor.exporter.spans}
    assert spans["log"].context.trace_id == spans["purchase"].context.trace_id == int(
        PARENT[3:35], 16)
    assert spans["log"].parent.span_id == spans["purchase"].context.span_id
    assert spans["log"].links[0].context.span_id == spans["batch"].context.span_id


def test_a_full_export_queue_drops_and_counts_the_newest():
    exporter = Kept()
    exporter.gate.clear()  # the collector hangs: the thread's first export blocks
    counted: dict[str, int] = {}
    t = Tracing.create(exporter, "x", queue=3, batch=1, delay=0.01,
                       count=lambda what, n: counted.update({what: counted.get(what, 0) + n}))
    processor = t.processor
    names = [f"s{i}" for i in range(6)]
    t.start(names[0]).end()
    deadline = time.monotonic() + 5
    while processor.queue and time.monotonic() < deadline:  # s0 taken by the thread
        time.sleep(0.01)
    for name in names[1:]:
        t.start(name).end()
    assert counted == {"queue_full": 2} and len(processor.queue) == 3
    exporter.gate.set()
    assert processor.force_flush(5000)
    assert [s.name for s in exporter.spans] == names[:4]
    assert counted == {"queue_full": 2, "exported": 4}
    t.close()



class _Batch:
    """A SpanSource: its records built only when the export thread asks."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.spans, self.built = names, len(names), 0

    def records(self) -> list:
        from engine.tracewire import INTERNAL, SpanRecord

        self.built += 1
        return [SpanRecord(n, INTERNAL, 1, i + 1) for i, n in enumerate(self.names)]


def test_a_batch_handed_over_is_built_in_the_export_and_bounded_by_its_spans():
    exporter = Kept()
    counted: dict[str, int] = {}
    t = Tracing.create(exporter, "x", queue=4, batch=100, delay=60,
                       count=lambda what, n: counted.update({what: counted.get(what, 0) + n}))
    first, second = _Batch(["a", "b", "c"]), _Batch(["d", "e"])
    t.emit_later(first)
    t.emit_later(second)  # (3 + 2 spans: no room for the second's two)
    assert counted == {"queue_full": 2} and t.processor.size == 3
    assert first.built == 0  # (nothing built until it is exported)
    assert t.flush()
    assert [s.name for s in exporter.spans] == ["a", "b", "c"] and first.built == 1
    assert t.processor.size == 0 and counted["exported"] == 3
    t.close()

class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[dict]:
        """What the JSON log lines of the kept records say."""
        return [orjson.loads(JsonFormatter().format(r)) for r in self.records]


@pytest.fixture
def logged():
    """(a logger, the handler keeping its records)."""
    logger = logging.getLogger("seckill.test.tracing")
    handler = _Kept()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_log_lines_inside_a_sampled_span_name_it(tracing, logged):
    logger, kept = logged
    span = tracing.start("purchase")
    with tracing.current(span):
        logger.warning("inside")
    logger.warning("outside")
    inside, outside = kept.lines()
    ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"
    assert "trace_id" not in outside and "span_id" not in outside


def test_spans_reach_an_otlp_endpoint_named_by_the_setting():
    with OtlpReceiver() as receiver:
        t = setup(Settings(trace_sample=1.0, trace_endpoint=receiver.endpoint), "seckill-bff")
        assert t is not None
        try:
            root = t.start("purchase", kind="server", attributes={"seckill.product_id": 7})
            t.start("gate", t.from_stream(t.stream_value(root)), kind="client").end()
            root.end()
            assert t.flush()
        finally:
            t.close()
        spans = {s.name: s for s in receiver.spans()}
    assert spans["purchase"].service == "seckill-bff"
    assert spans["purchase"].kind == "server" and spans["gate"].kind == "client"
    assert spans["purchase"].attributes == {"seckill.product_id": 7}
    assert spans["gate"].parent_id == spans["purchase"].span_id
    assert spans["gate"].trace_id == spans["purchase"].trace_id


def test_the_standard_otel_variables_name_the_endpoint_and_the_service(monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-edge")
        t = setup(Settings(trace_sample=0.5), "seckill-bff")
        assert t is not None
        try:
            t.start("purchase").end()
            assert t.flush()
        finally:
            t.close()
        assert [(s.service, s.name) for s in receiver.spans()] == [("checkout-edge",
                                                                    "purchase")]


def test_the_stream_field_name_is_one_short_field():
    assert STREAM_FIELD == b"tp"


def test_a_carried_context_that_is_not_sampled_starts_nothing(tracing):
    """Our hops carry only sampled orders' contexts: anything else is someone else's."""
    assert tracing.from_stream(UNSAMPLED) is None
    assert tracing.from_headers({"traceparent": UNSAMPLED}) is None
    assert tracing.http_parent(UNSAMPLED, None) is not None  # (the edge reads its flag)


def test_the_exporter_sends_with_its_urllib3_transport_unless_tls_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lighter of the SDK exporter's two transports, and it delivers; a certificate
    set through OTEL_* keeps the default transport, which reads it."""
    from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
    from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

    with OtlpReceiver() as receiver:
        exporter = otlp_exporter(receiver.endpoint + "/v1/traces")
        assert isinstance(exporter._client._transport, Urllib3HTTPTransport)
        assert exporter._client.export(b"").success  # (an empty request: no spans)
        assert receiver.requests == 1
        exporter.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ssl/certs/ca-certificates.crt")
    exporter = otlp_exporter("https://collector.invalid:4318/v1/traces")
    assert isinstance(exporter._client._transport, RequestsHTTPTransport)
    exporter.shutdown()


def test_a_served_span_is_a_record_with_its_parent_attributes_and_log_context(tracing,
                                                                            logged):
    """The BFF's purchase span (Tracing.served): exported as the SDK's would be, a child
    of a trusted parent or a new trace, failed by an exception, named by log lines."""
    logger, kept = logged
    attributes: dict = {"url.path": "/buy"}
    with tracing.served("POST /buy", tracing.http_parent(PARENT, "k=v"), attributes) as span:
        attributes["http.response.status_code"] = 202
        logger.warning("inside")
        value = span.stream_value()
    with pytest.raises(ValueError), tracing.served("POST /buy", None, {}) as root:
        raise ValueError("no")
    logger.warning("outside")
    tracing.flush()
    child, failed = tracing.processor.exporter.spans
    assert value == f"00-{PARENT[3:35]}-{span.span_id:016x}-01 k=v"
    assert tracing.stream_ids(value) == (int(PARENT[3:35], 16), span.span_id, "k=v")
    assert (child.name, child.kind.name, child.context.span_id) == ("POST /buy", "SERVER",
                                                                   span.span_id)
    assert child.parent.span_id == int(PARENT[36:52], 16) and child.parent.is_remote
    assert dict(child.attributes) == {"url.path": "/buy", "http.response.status_code": 202}
    assert child.status.is_ok and child.end_time >= child.start_time
    assert failed.parent is None and failed.context.trace_id == root.trace_id
    assert not failed.status.is_ok and failed.status.description == "ValueError: no"
    inside, outside = kept.lines()
    assert (inside["trace_id"], inside["span_id"]) == (PARENT[3:35], f"{span.span_id:016x}")
    assert "trace_id" not in outside
