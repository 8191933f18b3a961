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
batch's span alone. What a batch does while it runs is the least that must be done
then: a span ID per sampled order (its message names it), a clock reading as each
stage begins and ends, and the sampled orders a stage lost when it lost any. Its end
hands the whole to the export thread (`Tracing.emit_later`), which writes its spans'
OTLP encoding straight from it (`encoded`, engine.tracewire; `records` makes them as
plain records for any other exporter): no SDK span, no context attached per stage.
Built at each batch's end, among a thousand orders' work, the records cost some three
times what they cost in a loop (docs/operations.md, Tracing); in the export thread
a few hundred spans are written in a row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from engine.pipeline.orders import Entry, Order
from engine.tracewire import (
    CONSUMER,
    INTERNAL,
    SpanRecord,
    events_bytes,
    order_field,
    span_field,
    stage_field,
)
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


class _Stage:
    """One stage's span while it runs (BatchTrace.stage): a class, where a generator's
    context manager made three objects and six calls more per stage."""

    __slots__ = ("trace", "name", "event", "mine", "begun")

    def __init__(self, trace: BatchTrace, name: str, event: str, mine: list[str] | None
                 ) -> None:
        self.trace, self.name, self.event, self.mine = trace, name, event, mine

    def __enter__(self) -> list[str]:
        self.begun = time.time_ns()
        return self.trace.ids if self.mine is None else self.mine

    def __exit__(self, *exc: object) -> None:
        self.trace.stages.append((self.name, self.event, self.begun, time.time_ns(),
                                  self.mine))


class BatchTrace:
    """The batch's spans and its sampled orders' (module docstring); `end` once."""

    __slots__ = ("tracing", "entries", "ids", "index", "places", "parents", "span_ids",
                 "read_ns", "now_ns", "stages", "dead", "end_ns", "_headers", "_ids",
                 "spans")

    def __init__(self, tracing: Tracing, sampled: Mapping[str, Sampled], entries: int,
                 read_ns: int | None = None) -> None:
        self.tracing = tracing
        self.entries = entries
        self.ids = list(sampled)  # the sampled orders' entry IDs
        self.index = {eid: i for i, eid in enumerate(self.ids)}
        self.places = [place for place, _ in sampled.values()]
        self.parents = [parent for _, parent in sampled.values()]
        new_id, span_id = tracing.new_id, tracing.span_id
        self.span_ids = [new_id(64) or span_id() for _ in self.ids]
        self.read_ns = read_ns
        self.now_ns = time.time_ns()  # the read is over
        # (name, event, begun, ended, the sampled orders among its orders: None for all)
        self.stages: list[tuple[str, str, int, int, list[str] | None]] = []
        self.dead: set[str] = set()
        self.end_ns = 0
        self._headers: list[dict[str, str]] | None = None
        self._ids: tuple[int, int, list[int]] | None = None  # (_batch_ids)
        self.spans = 0  # (SpanSource: how many records it makes, once ended)

    def whole(self, orders: Sequence[Order]) -> bool:
        """Whether a stage's `orders` are the batch as it was read: as many (the decoded
        orders keep the entries' order, a stage only ever loses some), each sampled one
        where its entry was."""
        if len(orders) != self.entries:
            return False
        for eid, place in zip(self.ids, self.places, strict=True):
            if orders[place].entry_id != eid:
                return False
        return True

    def among(self, orders: Sequence[Order]) -> list[str]:
        """The sampled orders among `orders`, some of this batch's. Only a stage that
        lost some is looked through (module docstring): at 1% nearly every batch
        holds a sampled order, and a look per order per stage was most of what
        tracing cost the engine."""
        return list(self.ids) if self.whole(orders) else self._looked_up(orders)

    def _looked_up(self, orders: Sequence[Order]) -> list[str]:
        index = self.index
        return [o.entry_id for o in orders if o.entry_id in index]

    def stage(self, name: str, event: str, orders: Sequence[Order]) -> _Stage:
        """The batch's span of one stage while it runs (a context manager); each sampled
        order among `orders` (the stage's; their entry IDs given by `with`) gets
        `event` at its end."""
        return _Stage(self, name, event,
                      None if self.whole(orders) else self._looked_up(orders))

    def headers(self, orders: Sequence[Order]) -> dict[int, dict[str, str]] | None:
        """The AMQP headers of a publish's messages, by their index in `orders` (one
        message each): those of the sampled orders, naming each one's span; None when
        none is sampled."""
        made = self._headers
        if made is None:
            made = self._headers = []
            for (trace_id, _, state), span_id in zip(self.parents, self.span_ids,
                                                     strict=True):
                carried = {TRACEPARENT: sampled_traceparent(trace_id, span_id)}
                if state:
                    carried[TRACESTATE] = state
                made.append(carried)
        if self.whole(orders):
            return dict(zip(self.places, made, strict=True))
        index = self.index
        found = {i: made[index[o.entry_id]] for i, o in enumerate(orders)
                 if o.entry_id in index}
        return found or None

    def dead_lettered(self, entry_ids: Iterable[str]) -> None:
        """The sampled orders among `entry_ids` became dead letters: their spans fail."""
        index = self.index
        self.dead.update(eid for eid in entry_ids if eid in index)

    def end(self) -> None:
        """Hand the batch's spans to the export thread (once, whatever became of it)."""
        self.end_ns = time.time_ns()
        self.spans = len(self.ids) + 2 + len(self.stages)  # (+ the batch's and the read's)
        self.tracing.emit_later(self)

    def _batch_ids(self) -> tuple[int, int, list[int]]:
        """The batch's trace ID, its span's ID and its stages' (the read's first): made
        once, so that `records` and `encoded` name the same spans."""
        if self._ids is None:
            new_id = self.tracing.span_id
            self._ids = (self.tracing.trace_id(), new_id(),
                         [new_id() for _ in range(len(self.stages) + 1)])
        return self._ids

    def _events(self, eid: str) -> list[tuple[str, int]]:
        """A sampled order's events: read, then each stage it was among."""
        return [("read", self.now_ns), *((event, ended) for _, event, _, ended, mine
                                         in self.stages if mine is None or eid in mine)]

    def _starts(self) -> tuple[list[int], int]:
        """Each sampled order's start (its entry's creation), and the batch's."""
        now = self.now_ns
        starts = [min(entry_ns(eid), now) for eid in self.ids]
        return starts, min([self.read_ns or now, now, *starts])

    def records(self) -> list[SpanRecord]:
        """Every span of the ended batch, as records (for an exporter other than OTLP's;
        `encoded` is what the OTLP request carries)."""
        end, dead = self.end_ns, self.dead
        starts, start = self._starts()
        trace_id, batch_id, stage_ids = self._batch_ids()
        records = [SpanRecord("engine.order", CONSUMER, parent[0], span_id, parent[1], True,
                              parent[2], order_start, end, {"seckill.entry_id": eid},
                              self._events(eid), (),
                              "dead-lettered" if eid in dead else None)
                   for eid, parent, span_id, order_start in zip(
                       self.ids, self.parents, self.span_ids, starts, strict=True)]
        records.append(self._batch_record(start))
        records += [SpanRecord(name, INTERNAL, trace_id, stage_id, batch_id, False, "",
                               begun, ended)
                    for (name, begun, ended), stage_id in zip(self._stage_spans(start),
                                                              stage_ids, strict=True)]
        return records

    def _stage_spans(self, start: int) -> list[tuple[str, int, int]]:
        """(name, start, end) of each stage's span, the read's first: from the oldest
        entry's creation (`start`) until it was read."""
        return [("engine.read", start, self.now_ns),
                *((f"engine.{name}", begun, ended) for name, _, begun, ended, _ in self.stages)]

    def _batch_record(self, start: int) -> SpanRecord:
        trace_id, batch_id, _ = self._batch_ids()
        return SpanRecord(
            "engine.batch", CONSUMER, trace_id, batch_id, 0, False, "", start, self.end_ns,
            {"seckill.entries": self.entries, "seckill.sampled": len(self.ids)}, (),
            [(parent[0], span_id) for parent, span_id in zip(self.parents, self.span_ids,
                                                             strict=True)])

    def encoded(self) -> bytes:
        """`records` as the OTLP request's span fields (engine.tracewire), without
        making them: the order spans' events, the same for every order a stage did
        not lose, encoded once."""
        end, dead = self.end_ns, self.dead
        starts, start = self._starts()
        trace_id, batch_id, stage_ids = self._batch_ids()
        # (no stage lost a sampled order: they all have the same events)
        shared = events_bytes(self._events("")) if all(
            mine is None for *_, mine in self.stages) else None
        parts = []
        for eid, (parent_trace, parent_id, state), span_id, order_start in zip(
                self.ids, self.parents, self.span_ids, starts, strict=True):
            events = shared if shared is not None else events_bytes(self._events(eid))
            parts.append(order_field(parent_trace, span_id, parent_id, state, order_start,
                                     end, eid, events, "dead-lettered" if eid in dead else None))
        parts.append(span_field(self._batch_record(start)))
        trace_bytes, batch_bytes = trace_id.to_bytes(16, "big"), batch_id.to_bytes(8, "big")
        parts += [stage_field(name, trace_bytes, stage_id, batch_bytes, begun, ended)
                  for (name, begun, ended), stage_id in zip(self._stage_spans(start),
                                                            stage_ids, strict=True)]
        return b"".join(parts)
