"""The spans of a batch that holds sampled orders (engine.tracing).

Only an order the BFF sampled carries `STREAM_FIELD` in its stream entry, so a
batch is looked at once (`sampled_parents`) and, without one, costs nothing more.
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
batch's span alone, because a span is dear: tens of microseconds with its export,
and a link ten more, against the 18 us the engine spends on an order
(bench/tracecost.py). A child span per stage per order, or the links repeated on
every stage span, would multiply that by four.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from engine.pipeline.orders import Entry
from engine.tracing import STREAM_FIELD, Tracing, parent_of

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

MS = 1_000_000  # ns


def sampled_parents(tracing: Tracing, entries: Iterable[Entry]) -> dict[str, Context] | None:
    """entry ID -> the BFF's context, of every entry that carries one; None when none
    does (the common batch: one dict lookup per entry, nothing made)."""
    found: dict[str, Context] | None = None
    for entry in entries:
        value = entry.fields.get(STREAM_FIELD)
        if value is not None:
            context = tracing.from_stream(value)
            if context is not None:
                if found is None:
                    found = {}
                found[entry.stream_id] = context
    return found


def entry_ns(entry_id: str) -> int:
    """When Redis made an entry (its auto-generated ID's milliseconds), in unix ns."""
    head = entry_id.partition("-")[0]
    return int(head) * MS if head.isdigit() else time.time_ns()


class BatchTrace:
    """The batch's spans and its sampled orders' (module docstring); `end` once."""

    def __init__(self, tracing: Tracing, parents: Mapping[str, Context], entries: int,
                 read_ns: int | None = None) -> None:
        self.tracing = tracing
        now = time.time_ns()
        start = tracing.start
        begun = {eid: min(entry_ns(eid), now) for eid in parents}
        self.orders: dict[str, Span] = {
            eid: start("engine.order", ctx, kind="consumer", start_ns=begun[eid],
                       attributes={"seckill.entry_id": eid})
            for eid, ctx in parents.items()}
        self.links = [s.get_span_context() for s in self.orders.values()]
        first = min([read_ns or now, now, *begun.values()])
        self.batch = start("engine.batch", kind="consumer", links=self.links, start_ns=first,
                           attributes={"seckill.entries": entries,
                                       "seckill.sampled": len(self.orders)})
        # the read stage, over already: from the oldest entry's creation until it was read
        start("engine.read", parent_of(self.batch), start_ns=first).end(now)
        for span in self.orders.values():
            span.add_event("read", timestamp=now)

    @contextmanager
    def stage(self, name: str, event: str, entry_ids: Iterable[str]) -> Iterator[list[str]]:
        """The batch's span of one stage while it runs; each sampled order among `entry_ids`
        (the stage's orders, yielded) gets `event` at its end."""
        orders = self.orders
        mine = [eid for eid in entry_ids if eid in orders]
        span = self.tracing.start(f"engine.{name}", parent_of(self.batch))
        try:
            yield mine
        finally:
            end = time.time_ns()
            for eid in mine:
                orders[eid].add_event(event, timestamp=end)
            span.end(end)

    def headers(self, entry_ids: Sequence[str]) -> dict[int, dict[str, str]] | None:
        """The AMQP headers of a publish's messages, by their index in `entry_ids`: those
        of the sampled orders, naming each one's span; None when none is sampled."""
        orders, headers = self.orders, self.tracing.headers
        found = {i: headers(orders[eid]) for i, eid in enumerate(entry_ids) if eid in orders}
        return found or None

    def dead_lettered(self, entry_ids: Iterable[str]) -> None:
        """The sampled orders among `entry_ids` became dead letters: their spans fail."""
        orders = self.orders
        mine = [orders[eid] for eid in entry_ids if eid in orders]
        if mine:
            from opentelemetry.trace import Status, StatusCode

            for span in mine:
                span.set_status(Status(StatusCode.ERROR, "dead-lettered"))

    def end(self) -> None:
        """End every span (once, whatever became of the batch)."""
        end = time.time_ns()
        for span in self.orders.values():
            span.end(end)
        self.batch.end(end)
