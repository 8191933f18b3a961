"""A batch's spans: found only for entries that carry a context, one span per sampled
order continuing its trace with an event per stage, the batch's own trace linked to
them, and the headers of a publish naming each order's span."""

from __future__ import annotations

import pytest

from engine.keys import Keys
from engine.pipeline.orders import Entry, Order, decode_batch
from engine.pipeline.ordertrace import BatchTrace, entry_ns, sampled_parents
from engine.testing.otlp import KeptSpans
from engine.tracing import STREAM_FIELD, Tracing, span_context_of

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
KEYS = Keys("seckill:")



@pytest.fixture
def tracing():
    t = Tracing.create(KeptSpans(), "seckill-engine", count=lambda what, n: None)
    yield t
    t.close()


def entry(n: int, context: str | None = None) -> Entry:
    fields = {b"uid": b"7", b"ts": b"1765000000", b"sale": b"s", b"slot": b"1"}
    if context is not None:
        fields[STREAM_FIELD] = context.encode()
    return Entry(KEYS.stream(1).encode(), f"1765000000{n:03d}-0", fields)


def decoded(batch: list[Entry]) -> list[Order]:
    """The batch's orders, as the pipeline's stages are handed them."""
    orders, dead = decode_batch(batch, KEYS, 4096)
    assert not dead
    return orders


def test_a_batch_without_a_context_has_no_trace(tracing):
    assert sampled_parents(tracing, [entry(1), entry(2)]) is None
    assert sampled_parents(tracing, [entry(1, "garbage")]) is None


def test_sampled_orders_continue_their_trace_and_the_batch_links_them(tracing):
    batch = [entry(1), entry(2, PARENT), entry(3)]
    parents = sampled_parents(tracing, batch)
    assert list(parents) == ["1765000000002-0"]
    assert parents["1765000000002-0"][0] == 1  # its place in the batch
    trace = BatchTrace(tracing, parents, len(batch))
    orders = decoded(batch)
    with trace.stage("log", "logged", orders) as mine:
        assert mine == ["1765000000002-0"]
    with trace.stage("publish", "published", orders):
        headers = trace.headers(orders)
    assert list(headers) == [1]
    assert trace.headers(orders[:1]) is None
    assert list(trace.headers(orders[1:])) == [0]  # a publish of fewer: its own places
    with trace.stage("ack", "acked", orders):
        pass
    trace.end()
    tracing.flush()
    spans = {s.name: s for s in tracing.processor.exporter.spans}
    order = spans["engine.order"]
    assert order.context.trace_id == int(PARENT[3:35], 16)
    assert order.parent.span_id == int(PARENT[36:52], 16)
    assert order.start_time == entry_ns("1765000000002-0")
    assert [e.name for e in order.events] == ["read", "logged", "published", "acked"]
    assert span_context_of(tracing.from_headers(headers[1])).span_id == order.context.span_id
    own = spans["engine.batch"]
    assert [link.context.span_id for link in own.links] == [order.context.span_id]
    assert own.context.trace_id != order.context.trace_id
    for stage in ("read", "log", "publish", "ack"):
        assert spans[f"engine.{stage}"].parent.span_id == own.context.span_id
    assert len(spans) == 6


def test_a_dead_lettered_sampled_order_ends_in_error(tracing):
    parents = sampled_parents(tracing, [entry(1, PARENT)])
    trace = BatchTrace(tracing, parents, 1)
    trace.dead_lettered(["1765000000001-0", "1765000000009-0"])
    trace.end()
    tracing.flush()
    order = next(s for s in tracing.processor.exporter.spans if s.name == "engine.order")
    assert not order.status.is_ok and order.status.description == "dead-lettered"


def test_a_stage_that_lost_a_sampled_order_gives_it_no_event(tracing):
    batch = [entry(1, PARENT), entry(2), entry(3, PARENT)]
    trace = BatchTrace(tracing, sampled_parents(tracing, batch), len(batch))
    orders = decoded(batch)
    assert trace.among(orders) == ["1765000000001-0", "1765000000003-0"]  # the whole batch
    with trace.stage("log", "logged", orders[1:]) as mine:  # the first was refused
        assert mine == ["1765000000003-0"]
    with trace.stage("publish", "published", orders[1:2]) as mine:  # the third unconfirmed
        assert mine == []
    trace.end()
    tracing.flush()
    orders = [s for s in tracing.processor.exporter.spans if s.name == "engine.order"]
    events = {s.start_time: [e.name for e in s.events] for s in orders}
    assert events == {entry_ns("1765000000001-0"): ["read"],
                      entry_ns("1765000000003-0"): ["read", "logged"]}


def test_as_many_orders_but_not_the_batch_read_are_looked_through(tracing):
    """The places the look found hold only for the batch as read: a stage handed as
    many orders in another order (none does today) is looked through, not trusted."""
    batch = [entry(1, PARENT), entry(2), entry(3)]
    trace = BatchTrace(tracing, sampled_parents(tracing, batch), len(batch))
    orders = decoded(batch)
    moved = [orders[1], orders[2], orders[0]]
    assert trace.among(moved) == ["1765000000001-0"]
    assert list(trace.headers(moved)) == [2]
    other = decoded([entry(4), entry(5), entry(6)])
    assert trace.among(other) == [] and trace.headers(other) is None
    trace.end()


@pytest.mark.parametrize("lost", [False, True])
def test_the_encoded_batch_is_its_records_encoded(tracing, lost):
    """What the OTLP request carries (BatchTrace.encoded, made without records) is byte
    for byte its records encoded: shared events or each order's own, a tracestate, a
    dead letter."""
    from engine.tracewire import span_field

    batch = [entry(1, PARENT), entry(2), entry(3, PARENT + " k=v"), entry(4, PARENT)]
    trace = BatchTrace(tracing, sampled_parents(tracing, batch), len(batch))
    orders = decoded(batch)
    with trace.stage("log", "logged", orders[1:] if lost else orders):
        pass
    with trace.stage("publish", "published", orders):
        pass
    trace.dead_lettered(["1765000000004-0"])
    trace.end()
    records = trace.records()
    assert len(records) == trace.spans == 3 + 2 + 2
    assert trace.encoded() == b"".join(span_field(r) for r in records)
