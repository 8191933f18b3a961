"""The chaos suite's checker: what a fault cost, counted from the ground truth.

After a fault and the recovery, the truth is read from every place an order leaves a
trace: what the gate accepted (the driver's record of its replies), the rows of
`seckill_logs`, the events a tap queue bound to the exchange received, and the
Resource Domain's table of what it provisioned. `score()` counts, as RabbitMQ's
own checker and Jepsen's analyses do:

- accepted: orders the gate accepted;
- lost: accepted, but with no row, or with a row whose event never reached the exchange;
- duplicated: an order with more than one instance ID (in its row and its events), or
  provisioned more than once (one instance provisioned twice, or two for one order);
- oversold: units sold beyond a product's stock, or one unit of a sale sold twice;
- unexpected: a row, event or stream entry for no accepted order (a stream entry the
  BFF wrote for a hostile request is one);
- server_errors: with the BFF in front, its answers that are a server error: any 5xx or
  no answer at all to a hostile request, and a 500 (a bug, not a service down: 503) or
  no answer to a buyer or a probe (None: the fault does not go through the BFF);
- recovery_s: from the fault's end to the stream drained (None: it never drained).

`score()` is a pure function of what it is given, so the counts are tested on crafted
inputs; `read_rows`, `read_provisioned` and `drained_after` read the real services.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

OrderKey = tuple[int, str]  # (product ID, stream entry ID): one order
EXAMPLES = 5  # of each kind of failure, kept for the report


class _Keyed:
    """What names an order in every source the checker reads."""

    __slots__ = ()
    product_id: int
    stream_id: str

    @property
    def key(self) -> OrderKey:
        return self.product_id, self.stream_id


@dataclass(frozen=True, slots=True)
class Accepted(_Keyed):
    """A purchase the gate accepted."""

    product_id: int
    stream_id: str
    sale_id: str | None = None
    slot: int | None = None


@dataclass(frozen=True, slots=True)
class Row(_Keyed):
    """A `seckill_logs` row."""

    product_id: int
    stream_id: str
    instance_id: int


@dataclass(frozen=True, slots=True)
class Event(_Keyed):
    """An INSTANCE_CREATED event the tap received (one per delivery: repeats included)."""

    product_id: int
    stream_id: str
    instance_id: int


@dataclass(frozen=True, slots=True)
class Answer:
    """The BFF's answer to one request: `kind` is 'hostile', 'buyer' or 'probe'; status
    None means no answer at all (a reset, a timeout, a crashed BFF)."""

    kind: str
    what: str
    status: int | None

    @property
    def server_error(self) -> bool:
        if self.status is None:
            return True
        if self.kind == "hostile":
            return self.status >= 500
        return self.status >= 500 and self.status != 503


@dataclass
class Score:
    """One fault's row of the scoreboard, with a few examples of each failure."""

    accepted: int = 0
    lost: int = 0
    duplicated: int = 0
    oversold: int = 0
    unexpected: int = 0
    recovery_s: float | None = None
    provisioned_twice: int = 0  # part of `duplicated`, named apart for the report
    server_errors: int | None = None  # the BFF's 5xx (None: the fault has no BFF)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.oversold or self.unexpected
                    or self.server_errors)

    def verdict(self, known_loss: str | None = None) -> str:
        """'pass', 'fail', or for a fault the design cannot survive, what it lost and why
        (named on the scoreboard, never hidden)."""
        if self.clean:
            return "pass"
        if known_loss and self.lost and not (self.duplicated or self.oversold
                                             or self.unexpected or self.server_errors):
            return f"known loss: {known_loss}"
        return "fail"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(accepted: Iterable[Accepted], rows: Iterable[Row], events: Iterable[Event],
          stock: Mapping[int, int], provisioned: Mapping[int, int] | None = None,
          recovery_s: float | None = None, *, entries: Iterable[OrderKey] | None = None,
          answers: Iterable[Answer] | None = None) -> Score:
    """Count what the fault cost. `stock`: units on sale per product; `provisioned`:
    how many times the Resource Domain provisioned each instance ID (None: not run);
    `entries`: the order streams' entries at the end (None: not read); `answers`: the
    BFF's answers (None: no BFF)."""
    orders = {a.key: a for a in accepted}
    row_of = {r.key: r for r in rows}
    ids_of: dict[OrderKey, set[int]] = defaultdict(set)
    events_of: dict[OrderKey, set[int]] = defaultdict(set)
    for r in row_of.values():
        ids_of[r.key].add(r.instance_id)
    for e in events:
        ids_of[e.key].add(e.instance_id)
        events_of[e.key].add(e.instance_id)
    out = Score(accepted=len(orders), recovery_s=recovery_s)
    lost = [k for k in orders if k not in row_of or row_of[k].instance_id not in events_of[k]]
    doubled = {k for k, ids in ids_of.items() if len(ids) > 1}
    twice = _provisioned_twice(ids_of, provisioned or {})
    unexpected = sorted({k for k in [*row_of, *events_of, *(entries or ())]
                         if k not in orders})
    oversold = _oversold(orders.values(), row_of, stock)
    out.lost, out.unexpected, out.oversold = len(lost), len(unexpected), sum(oversold.values())
    out.provisioned_twice = len(twice)
    failed = [a for a in answers or () if a.server_error]
    out.server_errors = None if answers is None else len(failed)
    out.duplicated = len(doubled | twice)
    out.examples = {name: [_name(k) for k in sorted(keys)[:EXAMPLES]] for name, keys in (
        ("lost", lost), ("duplicated", doubled | twice), ("unexpected", unexpected),
        ("oversold", [(pid, "") for pid in oversold])) if keys}
    if failed:
        out.examples["server_errors"] = sorted({f"{a.status or 'no answer'} to {a.kind}"
                                                f" {a.what}" for a in failed})[:EXAMPLES]
    return out


def _provisioned_twice(ids_of: Mapping[OrderKey, set[int]],
                       provisioned: Mapping[int, int]) -> set[OrderKey]:
    """Orders provisioned more than once: one instance of theirs twice, or two of them."""
    return {k for k, ids in ids_of.items() if sum(provisioned.get(i, 0) for i in ids) > 1}


def _oversold(orders: Iterable[Accepted], row_of: Mapping[OrderKey, Row],
              stock: Mapping[int, int]) -> dict[int, int]:
    """Units sold beyond the stock, per product (only products that were oversold)."""
    sold: Counter[int] = Counter()
    units: Counter[tuple[int, str | None, int]] = Counter()
    for key in {*[o.key for o in orders], *row_of}:
        sold[key[0]] += 1
    for o in orders:
        if o.slot is not None:
            units[(o.product_id, o.sale_id, o.slot)] += 1
    twice: Counter[int] = Counter()
    for (pid, _, _), n in units.items():
        twice[pid] += n - 1
    out = {}
    for pid in sold.keys() | twice.keys():
        extra = max(sold[pid] - stock.get(pid, 0), twice[pid])
        if extra > 0:
            out[pid] = extra
    return out


def _name(key: OrderKey) -> str:
    return f"{key[0]}/{key[1]}" if key[1] else str(key[0])


# -- reading the ground truth -------------------------------------------------------
async def read_rows(conn: Any, product_ids: list[int]) -> list[Row]:
    """The `seckill_logs` rows of these products (an asyncpg connection)."""
    records = await conn.fetch("SELECT product_id, stream_id, instance_id FROM seckill_logs"
                               " WHERE product_id = ANY($1::bigint[])", product_ids)
    return [Row(r["product_id"], r["stream_id"], r["instance_id"]) for r in records]


async def read_provisioned(conn: Any, instance_ids: list[int]) -> dict[int, int]:
    """How many times the reference Resource Domain finished provisioning each of these
    instances (its `attempts`; an instance it never saw is absent)."""
    records = await conn.fetch("SELECT instance_id, attempts FROM resource_domain.instances"
                               " WHERE instance_id = ANY($1::bigint[])", instance_ids)
    return {r["instance_id"]: r["attempts"] for r in records}


async def drained_after(fault_end: float, drained: Callable[[], Awaitable[bool]],
                        timeout: float, interval: float = 0.2) -> float | None:
    """Seconds from `fault_end` (time.monotonic()) until `drained()` holds; None if it
    did not within `timeout` seconds from now."""
    deadline = time.monotonic() + timeout
    while True:
        if await drained():
            return max(0.0, time.monotonic() - fault_end)
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval)
