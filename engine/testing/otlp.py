"""A small OTLP/HTTP collector for tests: spans exported to it are decoded and kept.

`OtlpReceiver` listens on a free port of this machine and answers POST /v1/traces
as a collector does: the body an ExportTraceServiceRequest in protobuf (gzip or
deflate allowed), decoded with opentelemetry-proto. A test points a process at
`receiver.endpoint` (`trace_endpoint`, or OTEL_EXPORTER_OTLP_ENDPOINT) and reads
back `spans()`, `trace(trace_id)`, or waits for the ones it expects.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine.testing.ports import HOST
from engine.testing.waits import wait_until

TRACES_PATH = "/v1/traces"
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
         5: "consumer"}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One exported span: IDs as lowercase hex ('' for no parent), times in unix ns."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace ID, span ID) of each link
    status: int = 0  # 0 unset, 1 ok, 2 error
    events: tuple[tuple[str, int], ...] = ()  # (name, unix ns) of each event


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint in a thread; `with OtlpReceiver() as r:`. With
    `keep=False` it only counts requests and bytes (a benchmark's collector: decoding
    every span would take the cores it measures)."""

    def __init__(self, host: str = HOST, port: int = 0, *, keep: bool = True) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.keep = keep
        self.requests = 0
        self.bytes = 0
        self._server = ThreadingHTTPServer((host, port), _handler(self._received))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL (as OTEL_EXPORTER_OTLP_ENDPOINT takes it)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace, oldest first."""
        return sorted((s for s in self.spans() if s.trace_id == trace_id),
                      key=lambda s: s.start_ns)

    def wait(self, check: Callable[[list[ReceivedSpan]], bool], timeout: float,
             what: str) -> list[ReceivedSpan]:
        """Every span so far, once `check(spans)` holds (WaitTimedOut naming `what`)."""
        wait_until(lambda: check(self.spans()), timeout, what)
        return self.spans()

    def _received(self, body: bytes) -> None:
        spans = decode(body) if self.keep else []
        with self._lock:
            self._spans.extend(spans)
            self.requests += 1
            self.bytes += len(body)


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest (protobuf)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope in resource_spans.scope_spans:
            for s in scope.spans:
                out.append(ReceivedSpan(
                    service, s.name, KINDS.get(s.kind, str(s.kind)), s.trace_id.hex(),
                    s.span_id.hex(), s.parent_span_id.hex(), s.start_time_unix_nano,
                    s.end_time_unix_nano, _attributes(s.attributes),
                    tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                    s.status.code, tuple((e.name, e.time_unix_nano) for e in s.events)))
    return out


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _handler(received: Callable[[bytes], None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # keep-alive, as a collector answers: over HTTP/1.0 every export request made
        # a new TCP connection, a cost of this receiver that a benchmark would charge
        # to the exporting process
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.rstrip("/") != TRACES_PATH:
                self._answer(404, b"")
                return
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            encoding = (self.headers.get("content-encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            try:
                received(body)
            except Exception:  # noqa: BLE001 - a body we cannot decode: the client's fault
                self._answer(400, b"")
                return
            self._answer(200, b"")  # an empty ExportTraceServiceResponse

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # (a test's output is not the place for every export request)

    return Handler


class KeptSpans:
    """An exporter that keeps what it is given, in this process: for tests of one
    component's spans, where the receiver's HTTP round trip adds nothing."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
