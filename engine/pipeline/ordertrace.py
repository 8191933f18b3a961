"""The spans of a batch that holds sampled orders (engine.tracing).

Only an order the BFF sampled carries `STREAM_FIELD` in its stream entry, so a
batch is looked at once (`sampled_parents`, where the decode found an entry other
than the gate's common one) and, without one, costs nothing more.
With one, what its stages are handed is the whole batch as a rule (nothing refused,
nothing left unconfirmed: the stage holds as many orders as the batch read), so the
sampled orders among them, and their places in the publish, are those the look
found, not looked for again among the batch's thousand orders per stage.
With some, `BatchTrace` keeps two views of the same work:

- the batch's own trace: `engine.batch`, linked to the sampled orders it carried, and
  a span per stage under it (`engine.read`, `engine.log`, `engine.publish`,
  `engine.ack`): what one batch did, for whoever looks at the engine;
- each sampled order's trace, continued from the BFF's span: one span, `engine.order`,
  from the entry's creation (its ID's time) to its acknowledgement, with an event
  as each stage ends (`read`, `logged`, `published`, `acked`), so the buyer's trace
  shows where its order waited. Its context is what the INSTANCE_CREATED message's
  `traceparent` names, so the Resource Domain's span nests under it.

One span per sampled order and five per batch that holds one, the links on the
batch's span alone. They are built when the batch ends, from the times its stages
noted (a `time.time_ns()` each), as engine.tracewire's plain records: no SDK span,
no context attached per stage, and the export thread encodes them by hand: a batch
holding sampled orders costs some 40 us more, and each of them some 14 us with its
encoding (an SDK span with its export: 30-50 us), against the 18 us the engine spends
on every order (bench/tracecost.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from engine.pipeline.orders import Entry, Order
from engine.tracewire import CONSUMER, INTERNAL, SpanRecord
from engine.tracing import STREAM_FIELD, TRACEPARENT, TRACESTATE, Tracing, sampled_traceparent

MS = 1_000_000  # ns
Parent = tuple[int, int, str]  # the BFF's span: trace ID, span ID, tracestate
Sampled = tuple[int, Parent]  # a sampled entry's place in its batch, and its parent


def sampled_parents(tracing: Tracing, entries: Sequence[Entry],
                    places: Iterable[int] | None = None) -> dict[str, Sampled] | None:
    """entry ID -> (its place in `entries`, the BFF's span), of every entry that
    carries one; None when none does. `places`: the only entries that may (those the
    decode did not take as the gate's common entry: `decode_batch(others=)`); a
    look through every entry of the batch cost 70 ns an entry, a third of what
    tracing cost a batch at 1%."""
    found: dict[str, Sampled] | None = None
    for place in range(len(entries)) if places is None else places:
        entry = entries[place]
        value = entry.fields.get(STREAM_FIELD)
        if value is not None:
            parent = tracing.stream_ids(value)
            if parent is not None:
                if found is None:
                    found = {}
                found[entry.stream_id] = (place, parent)
    return found


def entry_ns(entry_id: str) -> int:
    """When Redis made an entry (its auto-generated ID's milliseconds), in unix ns."""
    head = entry_id.partition("-")[0]
    return int(head) * MS if head.isdigit() else time.time_ns()


class _Order:
    """A sampled order's span while its batch runs."""

    __slots__ = ("place", "parent", "span_id", "start_ns", "events", "error", "headers")

    def __init__(self, place: int, parent: Parent, span_id: int, start_ns: int) -> None:
        self.place = place
        self.parent = parent
        self.span_id = span_id
        self.start_ns = start_ns
        self.events: list[tuple[str, int]] = []
        self.error: str | None = None
        trace_id, _, state = parent
        self.headers = {TRACEPARENT: sampled_traceparent(trace_id, span_id)}
        if state:
            self.headers[TRACESTATE] = state


class BatchTrace:
    """The batch's spans and its sampled orders' (module docstring); `end` once."""

    def __init__(self, tracing: Tracing, sampled: Mapping[str, Sampled], entries: int,
                 read_ns: int | None = None) -> None:
        self.tracing = tracing
        self.entries = entries
        now = time.time_ns()
        new_id = tracing.span_id
        self.orders = {eid: _Order(place, parent, new_id(), min(entry_ns(eid), now))
                       for eid, (place, parent) in sampled.items()}
        self.trace_id = tracing.trace_id()
        self.span_id = new_id()
        self.start_ns = min([read_ns or now, now, *(o.start_ns for o in self.orders.values())])
        # (name, start, end) of each stage's span; the read stage is over already: from
        # the oldest entry's creation until it was read
        self.stages: list[tuple[str, int, int]] = [("engine.read", self.start_ns, now)]
        for order in self.orders.values():
            order.events.append(("read", now))

    def whole(self, orders: Sequence[Order]) -> bool:
        """Whether a stage's `orders` are the batch as it was read: as many (the decoded
        orders keep the entries' order, a stage only ever loses some), each sampled one
        where its entry was."""
        return len(orders) == self.entries and all(
            orders[o.place].entry_id == eid for eid, o in self.orders.items())

    def among(self, orders: Sequence[Order]) -> list[str]:
        """The sampled orders among `orders`, some of this batch's. Only a stage that
        lost some is looked through (module docstring): at 1% nearly every batch
        holds a sampled order, and a look per order per stage was most of what
        tracing cost the engine."""
        sampled = self.orders
        if self.whole(orders):
            return list(sampled)
        return [o.entry_id for o in orders if o.entry_id in sampled]

    @contextmanager
    def stage(self, name: str, event: str, orders: Sequence[Order]) -> Iterator[list[str]]:
        """The batch's span of one stage while it runs; each sampled order among `orders`
        (the stage's; their entry IDs yielded) gets `event` at its end."""
        mine = self.among(orders)
        begun = time.time_ns()
        try:
            yield mine
        finally:
            end = time.time_ns()
            sampled = self.orders
            for eid in mine:
                sampled[eid].events.append((event, end))
            self.stages.append((f"engine.{name}", begun, end))

    def headers(self, orders: Sequence[Order]) -> dict[int, dict[str, str]] | None:
        """The AMQP headers of a publish's messages, by their index in `orders` (one
        message each): those of the sampled orders, naming each one's span; None when
        none is sampled."""
        sampled = self.orders
        if self.whole(orders):
            found = {o.place: o.headers for o in sampled.values()}
        else:
            found = {i: sampled[o.entry_id].headers for i, o in enumerate(orders)
                     if o.entry_id in sampled}
        return found or None

    def dead_lettered(self, entry_ids: Iterable[str]) -> None:
        """The sampled orders among `entry_ids` became dead letters: their spans fail."""
        orders = self.orders
        for eid in entry_ids:
            if eid in orders:
                orders[eid].error = "dead-lettered"

    def end(self) -> None:
        """Build and export every span (once, whatever became of the batch)."""
        end = time.time_ns()
        trace_id, span_id = self.trace_id, self.span_id
        records = [SpanRecord("engine.order", CONSUMER, o.parent[0], o.span_id, o.parent[1],
                              True, o.parent[2], o.start_ns, end,
                              {"seckill.entry_id": eid}, o.events, (), o.error)
                   for eid, o in self.orders.items()]
        records.append(SpanRecord(
            "engine.batch", CONSUMER, trace_id, span_id, 0, False, "", self.start_ns, end,
            {"seckill.entries": self.entries, "seckill.sampled": len(self.orders)}, (),
            [(o.parent[0], o.span_id) for o in self.orders.values()]))
        new_id = self.tracing.span_id
        records += [SpanRecord(name, INTERNAL, trace_id, new_id(), span_id, False, "",
                               begun, ended) for name, begun, ended in self.stages]
        self.tracing.emit(records)
