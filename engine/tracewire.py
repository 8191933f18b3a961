"""The engine's spans as plain records, and their OTLP protobuf encoding by hand.

A batch that holds sampled orders knows all its spans' times only when it ends, so
it builds them then, as `SpanRecord`s: no SDK span object, no context, no sampler,
no attribute validation per span. The export thread turns a queue's records into the
bytes of an ExportTraceServiceRequest (opentelemetry/proto/trace/v1/trace.proto) with
`encode_request`: a few `struct.pack`s and joins per span, where the SDK's encoder
builds a protobuf message per span, event, link and attribute (about 5x the CPU,
bench/tracecost.py). The SDK's OTLP/HTTP exporter still sends the bytes (its
endpoint, OTEL_* settings, headers, compression and retries); `readable` turns a
record into the SDK's ReadableSpan for any other exporter (a test's).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.protowire import varint as _varint

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

# Span.kind (trace.proto SpanKind)
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
# Span.flags: whether the parent is remote is known (SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK),
# and that it is (SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK), as the SDK's encoder sets them
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_LOCAL_FLAGS = b"\x85\x01" + struct.pack("<I", HAS_IS_REMOTE)  # field 16, fixed32
_REMOTE_FLAGS = b"\x85\x01" + struct.pack("<I", HAS_IS_REMOTE | IS_REMOTE)
_LINK_FLAGS = b"\x35" + struct.pack("<I", HAS_IS_REMOTE)  # Link.flags: field 6, fixed32
# Span.kind (6, varint), then the tag of start_time_unix_nano (7, fixed64)
_KINDS = {kind: bytes((0x30, kind, 0x39)) for kind in range(6)}


class SpanRecord(NamedTuple):
    """One finished span, as plain values (IDs as ints, times in unix ns)."""

    name: str
    kind: int
    trace_id: int
    span_id: int
    parent_id: int = 0  # 0: a root span
    parent_remote: bool = False  # the parent came from another process
    trace_state: str = ""
    start_ns: int = 0
    end_ns: int = 0
    attributes: Mapping[str, str | int | float | bool] | None = None
    events: Sequence[tuple[str, int]] = ()  # (name, unix ns)
    links: Sequence[tuple[int, int]] = ()  # (trace ID, span ID) of local spans
    error: str | None = None  # the status message of a failed span


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field (tag already shifted: (number << 3) | 2)."""
    return _varint(tag) + _varint(len(data)) + data


def _any_value(value: Any) -> bytes:
    """An AnyValue message."""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (list, tuple)):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(v)) for v in value))
    return _field(0x0A, str(value).encode())


def key_value(key: str, value: Any) -> bytes:
    """A KeyValue message."""
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


# what repeats from span to span, encoded once: span names (Span.name, field 5), the
# head of an event before its time (Span.events, 11: its length, Event.time_unix_nano,
# 1) and its name after it (Event.name, 2)
_names: dict[str, bytes] = {}
_events: dict[str, tuple[bytes, bytes]] = {}


def _span_name(name: str) -> bytes:
    found = _names.get(name)
    if found is None:
        found = _names[name] = _field(0x2A, name.encode())
    return found


def _event(name: str) -> tuple[bytes, bytes]:
    found = _events.get(name)
    if found is None:
        named = _field(0x12, name.encode())
        found = _events[name] = (b"\x5a" + _varint(9 + len(named)) + b"\x09", named)
    return found


def encode_span(r: SpanRecord) -> bytes:
    """A Span message."""
    parts = [b"\x0a\x10", r.trace_id.to_bytes(16, "big"), b"\x12\x08",
             r.span_id.to_bytes(8, "big")]
    if r.trace_state:
        parts.append(_field(0x1A, r.trace_state.encode()))
    if r.parent_id:
        parts += (b"\x22\x08", r.parent_id.to_bytes(8, "big"))
    parts += (_span_name(r.name), _KINDS[r.kind], _FIXED64(r.start_ns), b"\x41",
              _FIXED64(r.end_ns))
    if r.attributes:
        parts += [_field(0x4A, key_value(k, v)) for k, v in r.attributes.items()]
    for name, at in r.events:
        head, named = _events.get(name) or _event(name)
        parts += (head, _FIXED64(at), named)
    for trace_id, span_id in r.links:  # Link: trace ID (1), span ID (2), flags (6)
        parts += (b"\x6a\x21\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08",
                  span_id.to_bytes(8, "big"), _LINK_FLAGS)
    if r.error is not None:  # Status: message (2), code (3) = STATUS_CODE_ERROR
        parts.append(_field(0x7A, _field(0x12, r.error.encode()) + b"\x18\x02"))
    else:
        parts.append(b"\x7a\x00")  # (unset, but present: as the SDK's encoder writes it)
    parts.append(_REMOTE_FLAGS if r.parent_remote else _LOCAL_FLAGS)
    return b"".join(parts)


def span_field(r: SpanRecord) -> bytes:
    """A ScopeSpans.spans field (2) of one record."""
    return _field(0x12, encode_span(r))


def events_bytes(events: Iterable[tuple[str, int]]) -> bytes:
    """Span.events fields, as `encode_span` writes them: what the sampled orders of one
    batch share, encoded once for all of them (`order_field`)."""
    parts: list[bytes] = []
    for name, at in events:
        head, named = _events.get(name) or _event(name)
        parts += (head, _FIXED64(at), named)
    return b"".join(parts)


_ENTRY_ID_KEY = _field(0x0A, b"seckill.entry_id")
_ORDER_NAME_KIND = _span_name("engine.order") + _KINDS[CONSUMER]


def order_field(trace_id: int, span_id: int, parent_id: int, state: str, start_ns: int,
                end_ns: int, entry_id: str, events: bytes, error: str | None) -> bytes:
    """The ScopeSpans.spans field of a sampled order's `engine.order` span (engine.
    pipeline.ordertrace): byte for byte `span_field` of its SpanRecord (a consumer
    span, its parent remote, one attribute `seckill.entry_id`, `events` from
    `events_bytes`), without the record."""
    raw = entry_id.encode()
    value = b"\x0a" + _varint(len(raw)) + raw  # AnyValue.string_value
    pair = _ENTRY_ID_KEY + b"\x12" + _varint(len(value)) + value
    body = b"".join((
        b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big"),
        _field(0x1A, state.encode()) if state else b"",
        b"\x22\x08", parent_id.to_bytes(8, "big"), _ORDER_NAME_KIND, _FIXED64(start_ns),
        b"\x41", _FIXED64(end_ns), b"\x4a", _varint(len(pair)), pair, events,
        b"\x7a\x00" if error is None else _field(0x7A, _field(0x12, error.encode()) + b"\x18\x02"),
        _REMOTE_FLAGS))
    return b"\x12" + _varint(len(body)) + body


def stage_field(name: str, trace_id: bytes, span_id: int, parent_id: bytes, start_ns: int,
                end_ns: int) -> bytes:
    """The ScopeSpans.spans field of a batch's stage span: byte for byte `span_field` of
    its SpanRecord (internal, a local parent, nothing more); `trace_id` and
    `parent_id` given as their 16 and 8 bytes, the same for every stage."""
    body = b"".join((b"\x0a\x10", trace_id, b"\x12\x08", span_id.to_bytes(8, "big"),
                     b"\x22\x08", parent_id, _span_name(name), _KINDS[INTERNAL],
                     _FIXED64(start_ns), b"\x41", _FIXED64(end_ns), b"\x7a\x00", _LOCAL_FLAGS))
    return b"\x12" + _varint(len(body)) + body


def resource_bytes(attributes: Mapping[str, Any]) -> bytes:
    """A Resource message."""
    return b"".join(_field(0x0A, key_value(k, v)) for k, v in attributes.items())


def scope_bytes(name: str, version: str | None = None) -> bytes:
    """An InstrumentationScope message."""
    return _field(0x0A, name.encode()) + (_field(0x12, version.encode()) if version else b"")


def encode_request(records: Iterable[SpanRecord], resource: bytes, scope: bytes,
                   encoded: bytes = b"") -> bytes:
    """An ExportTraceServiceRequest of `records`, all of one resource and scope, and of
    the spans `encoded` already (ScopeSpans.spans fields: `span_field`'s, `order_field`'s
    and `stage_field`'s)."""
    spans = b"".join([_field(0x12, encode_span(r)) for r in records]) + encoded
    scope_spans = _field(0x0A, scope) + spans
    resource_spans = _field(0x0A, resource) + _field(0x12, scope_spans)
    return _field(0x0A, resource_spans)


def readable(r: SpanRecord, resource: Resource, scope: InstrumentationScope
             ) -> ReadableSpan:
    """The SDK's ReadableSpan of a record: what an exporter other than OTLP/HTTP takes."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import TraceState

    sampled = TraceFlags(TraceFlags.SAMPLED)
    state = TraceState.from_header([r.trace_state]) if r.trace_state else None
    context = SpanContext(r.trace_id, r.span_id, False, sampled, state)
    parent = (SpanContext(r.trace_id, r.parent_id, r.parent_remote, sampled, state)
              if r.parent_id else None)
    return ReadableSpan(
        r.name, context, parent, resource, dict(r.attributes or {}),
        tuple(Event(name, timestamp=at) for name, at in r.events),
        tuple(Link(SpanContext(t, s, False, sampled)) for t, s in r.links),
        SpanKind(r.kind - 1), None,
        Status(StatusCode.ERROR, r.error) if r.error is not None else Status(StatusCode.UNSET),
        r.start_ns, r.end_ns, scope)
