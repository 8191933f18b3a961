"""Follow one order across every service: OpenTelemetry spans, W3C trace context.

The BFF decides at the edge whether a purchase attempt is traced (`trace_sample`,
or the sampled flag of a `traceparent` its trusted proxy sent); every later hop
only follows that decision: the gate script writes a sampled order's context into
its stream entry (one field, STREAM_FIELD), the engine puts it on the order's
INSTANCE_CREATED message (the AMQP headers `traceparent` and `tracestate`), the
Resource Domain on its status report. An order without the context costs a later
hop nothing but the look for it.

`setup` returns None when `trace_sample` is 0: then no SDK is imported, no exporter
or thread started, and a caller's whole cost is its `if tracing is not None`.
Otherwise a `Tracing` holds the process's tracer, exports over OTLP/HTTP protobuf
(`trace_endpoint`, else the standard OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_SERVICE_NAME
names the service) from a queue of `trace_queue` finished spans: a slow or absent
collector loses spans, counted in seckill_trace_spans_dropped_total, and never
slows a purchase or a batch. Every log record made inside a sampled span carries
its `trace_id` and `span_id` (in the JSON log line).
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from engine.config import Settings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

    from engine.tracewire import SpanRecord

log = logging.getLogger("seckill.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# a sampled order's stream entry: "<traceparent>" or "<traceparent> <tracestate>"
STREAM_FIELD = b"tp"
# W3C trace context: version, trace ID, parent ID, flags; a future version may append more
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
MAX_TRACESTATE = 512  # W3C: a vendor may cut a longer one; we carry at most this much
DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
EXPORT_BATCH = 512  # spans per export request
EXPORT_DELAY = 5.0  # seconds a finished span waits, at most, for its batch (as the SDK's)
CLOSE_TIMEOUT = 2.0  # seconds a stopping process gives its last export
SCOPE = "seckill"  # the instrumentation scope of every span we make


def setup(settings: Settings, service: str) -> Tracing | None:
    """The process's tracing, or None when `trace_sample` is 0 (nothing imported,
    nothing started). `service` names it unless OTEL_SERVICE_NAME does."""
    if settings.trace_sample <= 0:
        return None
    endpoint = settings.trace_endpoint.rstrip("/")
    exporter = otlp_exporter(endpoint + TRACES_PATH if endpoint else None)
    traced = Tracing.create(exporter, service, ratio=settings.trace_sample,
                            queue=settings.trace_queue)
    # The SDK, its exporter and requests are some 10,000 objects that live as long as
    # the process: frozen out of the collector, a full collection does not walk them
    # (nor what the process booted with, which lives as long; called at boot only).
    gc.freeze()
    return traced


def otlp_exporter(endpoint: str | None) -> SpanExporter:
    """The SDK's OTLP/HTTP exporter (`endpoint`, else the OTEL_* variables), able to
    send requests encoded already (`export_encoded`: the engine's span records)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Exporter(OTLPSpanExporter):
        def export_encoded(self, data: bytes, spans: int) -> SpanExportResult:
            """Send one ExportTraceServiceRequest's bytes as `export` sends its own."""
            if self._shutdown:
                return SpanExportResult.FAILURE
            with self._metrics.export_operation(spans) as result:
                sent = self._client.export(data)
                if not sent.success:
                    result.error = sent.error
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    exporter = Exporter(endpoint=endpoint, **_light_transport())
    # (the SDK's private parts it sends with: a later SDK without them exports the
    # records as ReadableSpans through `export`, slower but the same spans)
    if not all(hasattr(exporter, a) for a in ("_client", "_metrics", "_shutdown")):
        del Exporter.export_encoded
    return exporter


# what makes the exporter's HTTPS client or session other than the plain default
_TRANSPORT_SETTINGS = ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                       "OTEL_EXPORTER_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                       "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                       "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                       "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER")


def _light_transport() -> dict[str, Any]:
    """The exporter's own urllib3 transport instead of its default, requests: a request
    of 16 KB cost the sending thread 0.41 ms of CPU against 0.89 (one every
    EXPORT_DELAY, from every process that traces). Only when no certificate, client
    key or credential provider is configured (those the default reads from OTEL_*);
    with one, or in an SDK without the transport, the default."""
    if any(os.environ.get(name) for name in _TRANSPORT_SETTINGS):
        return {}
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return {}
    return {"_transport": Urllib3HTTPTransport()}


class Tracing:
    """One process's tracer and its export; what every hop calls to start, carry and
    continue a trace."""

    def __init__(self, tracer: Tracer, provider: TracerProvider, ratio: float,
                 processor: BoundedSpanProcessor) -> None:
        from opentelemetry import trace

        self.tracer = tracer
        self.provider = provider
        self.ratio = ratio
        self.processor = processor
        self._random = random.random
        self._api = trace
        self.new_id = random.getrandbits  # (random reseeds itself in a forked child)

    @classmethod
    def create(cls, exporter: SpanExporter, service: str, *, ratio: float = 1.0,
               queue: int = 2048, batch: int = EXPORT_BATCH,
               delay: float = EXPORT_DELAY,
               count: Callable[[str, int], None] | None = None) -> Tracing:
        """A tracer exporting to `exporter` (the OTLP one, or a test's) through a queue of
        `queue` spans, counted by `count` (default: into Prometheus); the log hook
        installed."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": service})
        # The edge decides (`sampled`) and starts no span for an attempt it does not
        # sample; every later hop gets a context only from a sampled order (the carriers
        # refuse an unsampled one): so every span started is recorded, without the cost
        # of a sampler's decision per span.
        provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        processor = BoundedSpanProcessor(exporter, queue, batch=batch, delay=delay,
                                         count=count, resource=provider.resource)
        # (duck-typed: SpanProcessor's module is not imported when tracing is off)
        provider.add_span_processor(processor)  # type: ignore[arg-type]
        install_log_context()
        return cls(provider.get_tracer(SCOPE), provider, ratio, processor)

    # -- the edge -----------------------------------------------------------------

    def sampled(self, parent: Context | None) -> bool:
        """Whether an attempt is traced: as its trusted parent says, else by ratio."""
        if parent is not None:
            return span_context_of(parent).trace_flags.sampled
        return self._random() < self.ratio

    def http_parent(self, traceparent: str | None, tracestate: str | None) -> Context | None:
        """The context of an incoming request's `traceparent` (the caller has checked
        that it came from a trusted proxy), or None when it has none or a bad one."""
        found = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
        if found is None:
            return None
        version, trace_id, span_id, flags, rest = found.groups()
        if version == "ff" or (version == "00" and rest):  # (a later version may add more)
            return None
        tid, sid = int(trace_id, 16), int(span_id, 16)
        if not tid or not sid:
            return None
        api = self._api
        state = None
        if tracestate:
            from opentelemetry.trace.span import TraceState

            state = TraceState.from_header([tracestate[:MAX_TRACESTATE]])
        context = api.SpanContext(tid, sid, is_remote=True,
                                  trace_flags=api.TraceFlags(int(flags, 16)),
                                  trace_state=state)
        return api.set_span_in_context(api.NonRecordingSpan(context))

    # -- carriers -----------------------------------------------------------------

    @staticmethod
    def stream_ids(value: bytes | str | None) -> tuple[int, int, str] | None:
        """A stream entry's STREAM_FIELD as (trace ID, parent span ID, tracestate), if
        it carries a sampled context: `from_stream` without its SDK objects."""
        if not value:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        parent, _, state = text.partition(" ")
        found = _TRACEPARENT.fullmatch(parent)
        if found is None:
            return None
        version, trace_id, span_id, flags, rest = found.groups()
        if version == "ff" or (version == "00" and rest) or not int(flags, 16) & 1:
            return None
        tid, sid = int(trace_id, 16), int(span_id, 16)
        if not tid or not sid:
            return None
        return tid, sid, state[:MAX_TRACESTATE]

    def stream_value(self, span: Span) -> str:
        """A sampled order's STREAM_FIELD: its span's traceparent, and tracestate."""
        ctx = span.get_span_context()
        state = ctx.trace_state.to_header() if ctx.trace_state else ""
        return f"{traceparent_of(ctx)} {state}" if state else traceparent_of(ctx)

    def from_stream(self, value: bytes | str | None) -> Context | None:
        """The context a stream entry's STREAM_FIELD carries, or None (absent or bad)."""
        if not value:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        parent, _, state = text.partition(" ")
        return _sampled_only(self.http_parent(parent, state or None))

    def headers(self, span: Span) -> dict[str, str]:
        """The AMQP headers that carry `span`'s context on a message."""
        ctx = span.get_span_context()
        out = {TRACEPARENT: traceparent_of(ctx)}
        if ctx.trace_state:
            out[TRACESTATE] = ctx.trace_state.to_header()
        return out

    def from_headers(self, headers: Mapping[str, Any] | None) -> Context | None:
        """The context an AMQP message's headers table carries, or None."""
        if not headers:
            return None
        parent = _text(headers.get(TRACEPARENT))
        if not parent:
            return None
        return _sampled_only(self.http_parent(parent, _text(headers.get(TRACESTATE))))

    # -- spans --------------------------------------------------------------------

    def emit(self, records: Sequence[SpanRecord]) -> None:
        """Finished spans built by hand (engine.tracewire), to export as the SDK's are."""
        self.processor.on_records(records)

    def emit_later(self, source: SpanSource) -> None:
        """Finished spans the export thread encodes (or makes into records): a SpanSource."""
        self.processor.put(source, source.spans)

    @contextmanager
    def served(self, name: str, parent: Context | None,
               attributes: dict[str, str | int | float | bool]) -> Iterator[ServedSpan]:
        """A server span made as a record (engine.tracewire), not an SDK span: a child of
        `parent` (a trusted proxy's context), else a new trace's root. Log lines made
        inside it name it. Why not the SDK's: at 1% a sampled purchase runs the SDK's
        span code cold, between a hundred others that do not, and side by side a BFF
        sampling 1% cost 5-6% more CPU per purchase than one without tracing, five times
        what the same span costs in a loop (bench/tracebench.py); a record touches a
        tuple and a dict. `attributes` may be added to until the span ends."""
        if parent is not None:
            ctx = span_context_of(parent)
            trace_id, parent_id = ctx.trace_id, ctx.span_id
            state = ctx.trace_state.to_header() if ctx.trace_state else ""
        else:
            trace_id, parent_id, state = self.trace_id(), 0, ""
        span = ServedSpan(trace_id, self.span_id(), state)
        token = _record_ids.set((trace_id, span.span_id))
        start = time.time_ns()
        error = None
        try:
            yield span
        except BaseException as exc:  # (the span fails, as the SDK's use_span fails it)
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            _record_ids.reset(token)
            from engine.tracewire import SERVER, SpanRecord

            self.emit([SpanRecord(name, SERVER, trace_id, span.span_id, parent_id,
                                  parent is not None, state, start, time.time_ns(),
                                  attributes, (), (), error)])

    def span_id(self) -> int:
        """A new span ID (64 random bits, never 0)."""
        while True:
            found = self.new_id(64)
            if found:
                return found

    def trace_id(self) -> int:
        """A new trace ID (128 random bits, never 0)."""
        while True:
            found = self.new_id(128)
            if found:
                return found

    def start(self, name: str, parent: Context | None = None, *, kind: str = "internal",
              links: Sequence[SpanContext] = (), attributes: Mapping[str, Any] | None = None,
              start_ns: int | None = None) -> Span:
        """A span (end it yourself): a child of `parent`, else a root."""
        from opentelemetry.trace import Link, SpanKind

        return self.tracer.start_span(name, context=parent, kind=SpanKind[kind.upper()],
                                      links=[Link(c) for c in links], attributes=attributes,
                                      start_time=start_ns)

    @contextmanager
    def current(self, span: Span) -> Iterator[Span]:
        """`span` as the current one (log lines carry it), ended on the way out."""
        from opentelemetry.trace import use_span

        with use_span(span, end_on_exit=True, record_exception=True,
                      set_status_on_exception=True):
            yield span

    def within(self, span: Span) -> contextlib.AbstractContextManager[Span]:
        """`span` as the current one (log lines carry it), left open on the way out."""
        from opentelemetry.trace import use_span

        return use_span(span, end_on_exit=False)

    def flush(self, timeout: float = 10.0) -> bool:
        """Export every finished span now (tests; a process about to stop)."""
        return self.processor.force_flush(int(timeout * 1000))

    def close(self) -> None:
        """Export what is left (within CLOSE_TIMEOUT) and stop the export thread."""
        self.provider.shutdown()


class ServedSpan:
    """A record span while it runs (`Tracing.served`): what a hop carries on."""

    __slots__ = ("trace_id", "span_id", "state")

    def __init__(self, trace_id: int, span_id: int, state: str) -> None:
        self.trace_id, self.span_id, self.state = trace_id, span_id, state

    def stream_value(self) -> str:
        """Its STREAM_FIELD: traceparent, and tracestate after a space when there is one."""
        parent = sampled_traceparent(self.trace_id, self.span_id)
        return f"{parent} {self.state}" if self.state else parent


def sampled_traceparent(trace_id: int, span_id: int) -> str:
    """W3C `traceparent` (version 00) of a sampled span: what a record span carries on."""
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def traceparent_of(ctx: SpanContext) -> str:
    """W3C `traceparent` (version 00) of a span context."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span_context_of(context: Context) -> SpanContext:
    from opentelemetry.trace import get_current_span

    return get_current_span(context).get_span_context()


def parent_of(span: Span) -> Context:
    """A context whose current span is `span`: what a child span is started in."""
    from opentelemetry.trace import set_span_in_context

    return set_span_in_context(span)


def _sampled_only(context: Context | None) -> Context | None:
    """A carried context, if its sampled flag is set: an unsampled one (sent by someone
    else than our own hops, which carry only sampled orders') starts no span."""
    if context is None or not span_context_of(context).trace_flags.sampled:
        return None
    return context


def _text(value: object) -> str | None:
    """A header value as text: AMQP tables bring strings as str or bytes."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


class SpanSource(Protocol):
    """Finished spans whose records are built in the export thread (`records`), not
    by the code that made them: what the engine's batch (engine.pipeline.ordertrace)
    hands over at its end."""

    spans: int  # how many records it makes

    def records(self) -> list[SpanRecord]: ...

    def encoded(self) -> bytes:
        """Its records as an OTLP request's span fields (engine.tracewire)."""
        ...


class BoundedSpanProcessor:
    """Finished spans to an exporter, from a queue that never grows past `limit` spans.

    The SDK's BatchSpanProcessor bounds its queue too, but drops the oldest span
    silently (a warning per span); ours refuses the newest, counts it, and says
    nothing per span: a collector outage during a flash sale must cost a counter,
    not a log line per order. One daemon thread exports, at most about `batch` spans
    per request, every `delay` seconds or sooner when a batch is full.

    The queue holds the SDK's spans, lists of the engine's SpanRecords and
    SpanSources, which the export thread encodes (or makes into records): there that
    runs for a few hundred spans in a row, where at the end of each batch it ran
    once among a thousand orders' work, at three times its cost in a loop
    (docs/operations.md, Tracing). An exporter with `export_encoded` (otlp_exporter)
    is sent the records and sources encoded by engine.tracewire, in the same request
    as the SDK's spans; any other is given
    them as ReadableSpans.
    """

    def __init__(self, exporter: SpanExporter, limit: int, *, batch: int = EXPORT_BATCH,
                 delay: float = EXPORT_DELAY,
                 count: Callable[[str, int], None] | None = None,
                 resource: Resource | None = None) -> None:
        self.exporter = exporter
        self.limit = limit
        self.batch = batch
        self.delay = delay
        self.count = count or _prometheus_counts()
        self.resource = resource
        # (what was finished, how many spans it is): the SDK's span, a list of records or
        # a SpanSource; `size` spans in all
        self.queue: deque[tuple[Any, int]] = deque()
        self.size = 0
        self._lock = threading.Lock()  # the queue and its size, between the threads
        self._encoded: tuple[bytes, bytes] | None = None  # the resource's and scope's
        self._wake = threading.Event()
        self._exporting = threading.Lock()  # the thread and a flush never export at once
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="seckill-span-export",
                                        daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def _on_ending(self, span: Any) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.put(span, 1)

    def on_records(self, records: Sequence[SpanRecord]) -> None:
        self.put(list(records), len(records))

    def put(self, item: ReadableSpan | Sequence[SpanRecord] | SpanSource, spans: int) -> None:
        """Queue `item`, `spans` spans, unless the queue has no room for them all."""
        with self._lock:
            full = self._stopped or self.size + spans > self.limit
            if not full:
                self.queue.append((item, spans))
                self.size += spans
            wake = self.size >= self.batch
        if full:
            self.count("queue_full", spans)
        elif wake:
            self._wake.set()

    def _take(self) -> tuple[list[Any], int]:
        """Up to about `batch` spans' items off the queue (at least one), and how many
        spans they are."""
        with self._lock:
            items: list[Any] = []
            spans = 0
            while self.queue and (not items or spans + self.queue[0][1] <= self.batch):
                item, n = self.queue.popleft()
                items.append(item)
                spans += n
            self.size -= spans
        return items, spans

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._export_all(timeout_millis / 1000)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._export_all(CLOSE_TIMEOUT)
        self.exporter.shutdown()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.delay)
            self._wake.clear()
            self._export_all(None)

    def _export_all(self, timeout: float | None) -> bool:
        """Export the queue, batch by batch; False if a flush could not take its turn
        within `timeout` seconds, or an export failed."""
        if not self._exporting.acquire(timeout=-1 if timeout is None else timeout):
            return False
        ok = True
        try:
            while self.queue:
                ok = self._export(*self._take()) and ok
        finally:
            self._exporting.release()
        return ok

    def _export(self, items: list[Any], spans: int) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._send(items, spans)
        except Exception:  # noqa: BLE001 - an exporter's bug must not stop our thread
            log.warning("span export failed", exc_info=True, extra={"event": "trace_export"})
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.count("exported", spans)
            return True
        self.count("export_failed", spans)
        return False

    def _send(self, items: list[Any], spans: int) -> Any:
        """Export the queue's `items`: the SDK's spans, lists of records, SpanSources."""
        from engine.tracewire import encode_request, readable

        sdk: list[ReadableSpan] = []
        records: list[SpanRecord] = []
        sources: list[SpanSource] = []
        for item in items:
            if type(item) is list:
                records += item
            elif hasattr(item, "records"):
                sources.append(item)
            else:
                sdk.append(item)
        if not records and not sources:
            return self.exporter.export(sdk)
        resource = self.resource or _default_resource()
        export_encoded = getattr(self.exporter, "export_encoded", None)
        if export_encoded is None:
            scope = _scope()
            for source in sources:
                records += source.records()
            return self.exporter.export(
                [*sdk, *(readable(r, resource, scope) for r in records)])  # type: ignore[list-item]
        data = encode_request(records, *self._encoded_once(resource),
                              b"".join([source.encoded() for source in sources]))
        if sdk:  # (two serialized requests, concatenated: one with both lists of spans)
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

            data = encode_spans(sdk).SerializePartialToString() + data
        return export_encoded(data, spans)

    def _encoded_once(self, resource: Resource) -> tuple[bytes, bytes]:
        from engine.tracewire import resource_bytes, scope_bytes

        if self._encoded is None:
            self._encoded = (resource_bytes(resource.attributes), scope_bytes(SCOPE))
        return self._encoded


def _default_resource() -> Resource:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({})


def _scope() -> Any:
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    return InstrumentationScope(SCOPE)


def _prometheus_counts() -> Callable[[str, int], None]:
    """`count(what, n)` into engine.metrics.tracing, imported only now (tracing is on)."""
    from engine.metrics import tracing as metrics

    exported = metrics.SPANS_EXPORTED
    dropped = {reason: metrics.SPANS_DROPPED.labels(reason)
               for reason in ("queue_full", "export_failed")}

    def count(what: str, n: int) -> None:
        (exported if what == "exported" else dropped[what]).inc(n)
    return count


# -- logs ------------------------------------------------------------------------------

_installed = False
# the (trace ID, span ID) of the record span a task is inside (`Tracing.served`): the
# SDK's context knows nothing of it
_record_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "seckill_record_span", default=None)


def install_log_context() -> None:
    """Every log record made inside a sampled span gets `trace_id` and `span_id` (the
    JSON formatter writes a record's extra attributes); once per process, and only
    by a process that traces, so the others pay nothing per record."""
    global _installed
    if _installed:
        return
    from opentelemetry.trace import get_current_span

    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        ids = _record_ids.get()
        if ids is not None:
            made.trace_id, made.span_id = f"{ids[0]:032x}", f"{ids[1]:016x}"
            return made
        ctx = get_current_span().get_span_context()
        if ctx.trace_flags.sampled and ctx.is_valid:
            made.trace_id = f"{ctx.trace_id:032x}"
            made.span_id = f"{ctx.span_id:016x}"
        return made

    logging.setLogRecordFactory(record)
    _installed = True
