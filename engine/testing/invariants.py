"""The one checker of a sale's outcome, from the ground truth every place recorded.

An order leaves a trace in each place it passes: what the gate accepted (its
replies, or the entries it wrote to the order stream), the rows of `seckill_logs`,
the events a tap queue bound to the exchange received, and the Resource Domain's
table of what it provisioned. `check()` compares them and names every violation;
the load-test verifier prints them, the fault scoreboard counts them (`score()`),
and the tests assert there are none (`assert_one_id_per_order`). What each
counts, as RabbitMQ's own checker and Jepsen's analyses do:

- lost: accepted, but with no row, or with a row whose event never reached the exchange;
- duplicated: an order with more than one row or instance ID (in its rows and its
  events), one instance ID given to two orders, or an order provisioned more than
  once (one instance provisioned twice, or two for one order);
- oversold: units sold beyond a product's stock, or one unit of a sale sold twice;
- unexpected: a row, event or stream entry for no accepted order (a stream entry the
  BFF wrote for a hostile request is one);
- server_errors: with the BFF in front, its answers that are a server error: any 5xx or
  no answer at all to a hostile request, and a 500 (a bug, not a service down: 503) or
  no answer to a buyer or a probe (None: the fault does not go through the BFF).

`check()` is a pure function of what it is given, so each violation is tested on
crafted inputs; `read_rows` and `read_provisioned` read the real database, and
`gate_problems` checks the gate's own counters after a rehearsal.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
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
    """A purchase the gate accepted (its reply, or the entry it wrote)."""

    product_id: int
    stream_id: str
    sale_id: str | None = None
    slot: int | None = None
    user_id: int | None = None


@dataclass(frozen=True, slots=True)
class Row(_Keyed):
    """A `seckill_logs` row."""

    product_id: int
    stream_id: str
    instance_id: int

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Row:
        """From a database record (asyncpg's, or any mapping with these columns)."""
        return cls(record["product_id"], record["stream_id"], record["instance_id"])


@dataclass(frozen=True, slots=True)
class Event(_Keyed):
    """An INSTANCE_CREATED event the tap received (one per delivery: repeats included)."""

    product_id: int
    stream_id: str
    instance_id: int

    @classmethod
    def of(cls, event: Any) -> Event:
        """From the Protobuf message (engine.pb.event_pb2.Event)."""
        return cls(event.product_id, event.stream_id, event.instance_id)


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
class Violations:
    """Everything `check()` found, each kind apart (empty lists: that invariant holds)."""

    accepted: int = 0
    no_row: list[OrderKey] = field(default_factory=list)  # accepted, no row
    no_event: list[Row] = field(default_factory=list)  # logged, its event never came
    rows_for_no_order: list[Row] = field(default_factory=list)
    stray_events: list[Event] = field(default_factory=list)  # no row with its key and ID
    entries_for_no_order: list[OrderKey] = field(default_factory=list)
    several_rows: list[OrderKey] = field(default_factory=list)
    several_ids: list[OrderKey] = field(default_factory=list)  # rows and events together
    shared_ids: list[int] = field(default_factory=list)  # one instance ID, two orders
    orders_of_shared_ids: list[OrderKey] = field(default_factory=list)
    provisioned_twice: list[OrderKey] = field(default_factory=list)
    oversold: dict[int, int] = field(default_factory=dict)  # product -> units too many
    server_errors: list[Answer] | None = None  # None: no BFF in front
    accepted_keys: frozenset[OrderKey] = frozenset()

    def lost(self) -> list[OrderKey]:
        """Accepted orders with no row, or whose row's event never came."""
        missing = {*self.no_row, *(r.key for r in self.no_event)}
        return sorted(k for k in self.accepted_keys if k in missing)

    def duplicated(self) -> set[OrderKey]:
        return {*self.several_rows, *self.several_ids, *self.orders_of_shared_ids,
                *self.provisioned_twice}

    def unexpected(self) -> list[OrderKey]:
        keys = {*(r.key for r in self.rows_for_no_order), *self.entries_for_no_order,
                *(e.key for e in self.stray_events)}
        return sorted(k for k in keys if k not in self.accepted_keys)

    def problems(self) -> list[str]:
        """One line for each invariant that does not hold."""
        out = []
        if self.no_row or self.rows_for_no_order:
            out.append(f"{len(self.no_row)} accepted orders have no row, "
                       f"{len(self.rows_for_no_order)} rows match no accepted order")
        if self.several_rows:
            out.append("an order has more than one row")
        if self.shared_ids:
            out.append("two orders share an instance ID")
        if self.no_event:
            out.append(f"{len(self.no_event)} logged orders' events never reached the exchange")
        if self.stray_events:
            e = self.stray_events[0]
            out.append(f"{len(self.stray_events)} events match no logged order, e.g. instance "
                       f"{e.instance_id} for entry {e.stream_id!r}")
        if self.several_ids:
            out.append(f"{len(self.several_ids)} orders have more than one instance ID")
        if self.provisioned_twice:
            out.append(f"{len(self.provisioned_twice)} orders provisioned more than once")
        if self.entries_for_no_order:
            out.append(f"{len(self.entries_for_no_order)} stream entries match no accepted "
                       "order")
        for pid, extra in sorted(self.oversold.items()):
            out.append(f"product {pid} oversold by {extra}")
        if self.server_errors:
            out.append(f"{len(self.server_errors)} server errors from the BFF")
        return out


def check(accepted: Iterable[Accepted], rows: Iterable[Row] | None = None,
          events: Iterable[Event] | None = None, *, stock: Mapping[int, int] | None = None,
          provisioned: Mapping[int, int] | None = None,
          entries: Iterable[OrderKey] | None = None,
          answers: Iterable[Answer] | None = None) -> Violations:
    """Compare the accepted orders with what every other place recorded. Each source is
    optional (None: not read, its invariants not checked): `rows` of seckill_logs,
    `events` from a tap, `stock` (units on sale per product), `provisioned` (how many
    times the Resource Domain provisioned each instance ID), `entries` (the order
    streams' entries at the end), `answers` (the BFF's)."""
    orders = {a.key: a for a in accepted}
    found = Violations(accepted=len(orders), accepted_keys=frozenset(orders))
    row_list = list(rows or ())
    rows_of: dict[OrderKey, list[Row]] = defaultdict(list)
    for r in row_list:
        rows_of[r.key].append(r)
    ids_of: dict[OrderKey, set[int]] = defaultdict(set)
    for r in row_list:
        ids_of[r.key].add(r.instance_id)
    if rows is not None:
        found.no_row = sorted(k for k in orders if k not in rows_of)
        found.rows_for_no_order = [r for r in row_list if r.key not in orders]
        found.several_rows = sorted(k for k, rs in rows_of.items() if len(rs) > 1)
        _shared_ids(row_list, found)
    if events is not None:
        events_of: dict[OrderKey, set[int]] = defaultdict(set)
        for e in events:
            events_of[e.key].add(e.instance_id)
            ids_of[e.key].add(e.instance_id)
            if rows is not None and e.instance_id not in _row_ids(rows_of, e.key):
                found.stray_events.append(e)
        found.no_event = [r for r in row_list if r.instance_id not in events_of[r.key]]
    found.several_ids = sorted(k for k, ids in ids_of.items() if len(ids) > 1)
    found.provisioned_twice = sorted(_provisioned_twice(ids_of, provisioned or {}))
    if entries is not None:
        found.entries_for_no_order = sorted({k for k in entries if k not in orders})
    if stock is not None:
        found.oversold = _oversold(orders.values(), rows_of, stock)
    if answers is not None:
        found.server_errors = [a for a in answers if a.server_error]
    return found


def _row_ids(rows_of: Mapping[OrderKey, list[Row]], key: OrderKey) -> set[int]:
    return {r.instance_id for r in rows_of.get(key, ())}


def _shared_ids(rows: list[Row], found: Violations) -> None:
    """Instance IDs that more than one order's rows carry, and those orders."""
    orders_of: dict[int, set[OrderKey]] = defaultdict(set)
    for r in rows:
        orders_of[r.instance_id].add(r.key)
    shared = {i: keys for i, keys in orders_of.items() if len(keys) > 1}
    found.shared_ids = sorted(shared)
    found.orders_of_shared_ids = sorted({k for keys in shared.values() for k in keys})


def _provisioned_twice(ids_of: Mapping[OrderKey, set[int]],
                       provisioned: Mapping[int, int]) -> set[OrderKey]:
    """Orders provisioned more than once: one instance of theirs twice, or two of them."""
    return {k for k, ids in ids_of.items() if sum(provisioned.get(i, 0) for i in ids) > 1}


def _oversold(orders: Iterable[Accepted], rows_of: Mapping[OrderKey, list[Row]],
              stock: Mapping[int, int]) -> dict[int, int]:
    """Units sold beyond the stock, per product (only products that were oversold)."""
    sold: Counter[int] = Counter()
    units: Counter[tuple[int, str | None, int]] = Counter()
    orders = list(orders)
    for key in {*[o.key for o in orders], *rows_of}:
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


# -- the fault scoreboard's counts ------------------------------------------------------
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

    @classmethod
    def of(cls, found: Violations, recovery_s: float | None = None) -> Score:
        lost, doubled, unexpected = found.lost(), found.duplicated(), found.unexpected()
        failed = found.server_errors
        out = cls(accepted=found.accepted, lost=len(lost), duplicated=len(doubled),
                  oversold=sum(found.oversold.values()), unexpected=len(unexpected),
                  recovery_s=recovery_s, provisioned_twice=len(found.provisioned_twice),
                  server_errors=None if failed is None else len(failed))
        out.examples = {name: [_name(k) for k in sorted(keys)[:EXAMPLES]] for name, keys in (
            ("lost", lost), ("duplicated", doubled), ("unexpected", unexpected),
            ("oversold", [(pid, "") for pid in found.oversold])) if keys}
        if failed:
            out.examples["server_errors"] = sorted({f"{a.status or 'no answer'} to {a.kind}"
                                                    f" {a.what}" for a in failed})[:EXAMPLES]
        return out

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
    """What a fault cost, counted from everything `check()` found."""
    return Score.of(check(accepted, rows, events, stock=stock, provisioned=provisioned,
                          entries=entries, answers=answers), recovery_s)


def _name(key: OrderKey) -> str:
    return f"{key[0]}/{key[1]}" if key[1] else str(key[0])


# -- the tests' check -------------------------------------------------------------------
def assert_one_id_per_order(rows: Iterable[Mapping[str, Any]], events: Iterable[Any],
                            orders: int) -> None:
    """After a run that logged `orders` orders: one row and one instance ID of its own
    per order, and every event carries its order's ID and every order has one.
    `rows` are database records, `events` the Protobuf messages a tap collected."""
    logged = [Row.of(r) for r in rows]
    found = check([Accepted(r.product_id, r.stream_id) for r in logged], logged,
                  [Event.of(e) for e in events])
    problems = found.problems()
    if len(logged) != orders:
        problems.insert(0, f"{len(logged)} rows for {orders} orders")
    assert not problems, "; ".join(problems)


# -- the gate's own counters ------------------------------------------------------------
def gate_problems(accepted: list[Accepted], *, stock: int, tried: int, left: int) -> list[str]:
    """After a rehearsal of one sale: its accepted orders (each with its user and slot)
    against the gate's counters: `tried` distinct users tried, `left` units unsold."""
    problems = []
    users = Counter(a.user_id for a in accepted)
    slots = Counter(a.slot for a in accepted if a.slot is not None)
    if len(accepted) != min(stock, tried):
        problems.append(f"accepted {len(accepted)} != min(stock {stock}, tried {tried})")
    if twice := [u for u, n in users.items() if n > 1]:
        problems.append(f"{len(twice)} users accepted more than once, e.g. {twice[:5]}")
    if left < 0:
        problems.append(f"stock is negative: {left}")
    if len(accepted) == stock and left != 0:
        problems.append(f"sold out but stock is {left}")
    if len(accepted) != stock - left:
        problems.append(f"stock left {left} does not match {len(accepted)} accepted of {stock}")
    if dup := [s for s, n in slots.items() if n > 1]:
        problems.append(f"slots sold twice: {dup[:5]}")
    if bad := [s for s in slots if not 1 <= s <= stock]:
        problems.append(f"slots outside 1..{stock}: {bad[:5]}")
    if len(accepted) == stock and set(slots) != set(range(1, stock + 1)):
        problems.append("sold out but not every slot 1..stock was used")
    return problems


# -- reading the ground truth -----------------------------------------------------------
async def read_rows(conn: Any, product_ids: list[int], sale: str | None = None, *,
                    timeout: float = 30.0) -> list[Row]:
    """The `seckill_logs` rows of these products (an asyncpg connection), of one sale
    if `sale` is given."""
    query = ("SELECT product_id, stream_id, instance_id FROM seckill_logs"
             " WHERE product_id = ANY($1::bigint[])")
    args: list[Any] = [product_ids]
    if sale is not None:
        query += " AND sale_id = $2"
        args.append(sale)
    return [Row.of(r) for r in await conn.fetch(query, *args, timeout=timeout)]


async def read_provisioned(conn: Any, instance_ids: list[int], *,
                           timeout: float = 30.0) -> dict[int, int]:
    """How many times the reference Resource Domain finished provisioning each of these
    instances (its `attempts`; an instance it never saw is absent)."""
    records = await conn.fetch("SELECT instance_id, attempts FROM resource_domain.instances"
                               " WHERE instance_id = ANY($1::bigint[])", instance_ids,
                               timeout=timeout)
    return {r["instance_id"]: r["attempts"] for r in records}


# -- a sale's units, with the waitlist --------------------------------------------------
# Row states that hold a unit, and those whose unit goes back (engine/orderstates.py)
LIVE_STATES = frozenset({"PROCESSING", "RUNNING", "RELEASING"})
GIVEN_BACK_STATES = frozenset({"FAILED", "RELEASED"})


@dataclass(frozen=True, slots=True)
class SaleEntry:
    """One order of a sale as its stream holds it; `turn` is the user's turn in the
    waitlist for an order made from a returned unit (`from` = waitlist), else None."""

    stream_id: str
    user_id: int
    slot: int | None
    turn: int | None = None


@dataclass
class Ledger:
    """What a sale's units are counted from: its `stock`, the units `left` in stock,
    its orders (`entries`, in stream order), the orders whose unit went back
    (`returned`: the gate's refunded set), the row state of each logged order
    (`statuses`, None: the database not read) and the turns still `waiting`."""

    stock: int
    left: int
    entries: list[SaleEntry]
    returned: frozenset[str] = frozenset()
    statuses: Mapping[str, str] | None = None
    waiting: list[int] = field(default_factory=list)

    def held(self) -> list[SaleEntry]:
        """Orders whose unit has not gone back (live, or given back but not returned yet)."""
        return [e for e in self.entries if e.stream_id not in self.returned]


def ledger_problems(ledger: Ledger) -> list[str]:
    """The invariants of a sale whose units can go back (failed orders, releases) and on
    to waiting users: one line per one that does not hold."""
    return [*_units(ledger), *_live_users(ledger), *_slot_chains(ledger),
            *_join_order(ledger)]


def _units(ledger: Ledger) -> list[str]:
    """Units in stock + units held by orders = the stock: a returned unit made exactly
    one new order or one unit of stock (both: one too many; neither: one too few). With
    the rows: units in stock + live orders (PROCESSING, RUNNING, RELEASING, or accepted
    and not logged yet) = the stock, once every given-back order's unit was returned."""
    out = []
    held = ledger.held()
    if ledger.left < 0:
        out.append(f"stock is negative: {ledger.left}")
    if ledger.left + len(held) != ledger.stock:
        handed = sum(e.turn is not None for e in ledger.entries)
        out.append(f"units: {ledger.left} in stock + {len(held)} held by orders != stock "
                   f"{ledger.stock} ({len(ledger.returned)} returned, {handed} handed to "
                   "the waitlist)")
    if ledger.statuses is None:
        return out
    status = ledger.statuses
    unreturned = [e.stream_id for e in held if status.get(e.stream_id) in GIVEN_BACK_STATES]
    if unreturned:
        out.append(f"{len(unreturned)} failed or released orders' units were never returned, "
                   f"e.g. {unreturned[:EXAMPLES]}")
    back_but_live = [e.stream_id for e in ledger.entries if e.stream_id in ledger.returned
                     and status.get(e.stream_id, "PENDING") not in GIVEN_BACK_STATES]
    if back_but_live:
        out.append(f"{len(back_but_live)} orders still live after their unit was returned, "
                   f"e.g. {back_but_live[:EXAMPLES]}")
    live = [e for e in ledger.entries if status.get(e.stream_id, "PENDING") not in
            GIVEN_BACK_STATES]
    if not unreturned and ledger.left + len(live) != ledger.stock:
        out.append(f"units: {ledger.left} in stock + {len(live)} live orders != stock "
                   f"{ledger.stock}")
    return out


def _live_users(ledger: Ledger) -> list[str]:
    users = Counter(e.user_id for e in ledger.held())
    twice = sorted(u for u, n in users.items() if n > 1)
    return [f"{len(twice)} users hold two live orders, e.g. {twice[:EXAMPLES]}"] if twice \
        else []


def _slot_chains(ledger: Ledger) -> list[str]:
    """Each slot passes from order to order only once its holder gave it back, and an
    order from the waitlist takes a returned unit: a unit handed twice, or taken again
    while held, shows as a holder followed by another without being returned."""
    holders: dict[int, list[SaleEntry]] = defaultdict(list)
    for e in ledger.entries:
        if e.slot is not None:
            holders[e.slot].append(e)
    taken_while_held = []
    for slot, chain in sorted(holders.items()):
        for before, after in zip(chain, chain[1:], strict=False):
            if before.stream_id not in ledger.returned:
                taken_while_held.append(f"slot {slot}: {after.stream_id} after "
                                        f"{before.stream_id}")
    handed_from_nothing = [e.stream_id for e in ledger.entries if e.turn is not None
                           and holders[e.slot or 0][0] is e]
    out = []
    if taken_while_held:
        out.append(f"{len(taken_while_held)} units taken again while their order held them, "
                   f"e.g. {taken_while_held[:EXAMPLES]}")
    if handed_from_nothing:
        out.append(f"{len(handed_from_nothing)} orders from the waitlist took a unit nobody "
                   f"returned, e.g. {handed_from_nothing[:EXAMPLES]}")
    if bad := sorted({e.slot for e in ledger.entries
                      if e.slot is not None and not 1 <= e.slot <= ledger.stock}):
        out.append(f"slots outside 1..{ledger.stock}: {bad[:EXAMPLES]}")
    return out


def _join_order(ledger: Ledger) -> list[str]:
    """Units left the waitlist in the order users joined it: the turns of the orders made
    from it rise in stream order, and nobody still waiting was passed over."""
    turns = [e.turn for e in ledger.entries if e.turn is not None]
    out = []
    jumps = [(a, b) for a, b in zip(turns, turns[1:], strict=False) if b <= a]
    if jumps:
        out.append(f"{len(jumps)} units left the waitlist out of join order, e.g. turn "
                   f"{jumps[0][1]} after turn {jumps[0][0]}")
    if turns and ledger.waiting and min(ledger.waiting) < max(turns):
        passed = sorted(t for t in ledger.waiting if t < max(turns))
        out.append(f"{len(passed)} waiting users were passed over, e.g. turns "
                   f"{passed[:EXAMPLES]} still wait after turn {max(turns)} got a unit")
    return out


async def read_ledger(redis: Any, keys: Any, pid: int, sale: str, stock: int, *,
                      conn: Any = None, timeout: float = 30.0) -> Ledger:
    """A sale's ledger from Redis (an asyncio client, `engine.keys.Keys`) and, given an
    asyncpg connection `conn`, its rows' states."""
    entries: list[SaleEntry] = []
    start = "-"
    while batch := await redis.xrange(keys.stream(pid), min=start, count=5000):
        for entry_id, fields in batch:
            if _text(fields.get(b"sale", b"")) != sale:
                continue
            turn = fields.get(b"turn") if fields.get(b"from") == b"waitlist" else None
            entries.append(SaleEntry(_text(entry_id), int(fields[b"uid"]),
                                     int(fields[b"slot"]) if b"slot" in fields else None,
                                     int(turn) if turn is not None else None))
        start = "(" + _text(batch[-1][0])
    refunded = {_text(m) for m in await redis.smembers(keys.refunded(pid))}
    waiting = [int(score) for _, score in
               await redis.zrange(keys.waitlist(pid), 0, -1, withscores=True)]
    ledger = Ledger(stock, int(await redis.get(keys.stock(pid)) or 0), entries,
                    frozenset(e.stream_id for e in entries if e.stream_id in refunded),
                    None, waiting)
    if conn is not None:
        records = await conn.fetch("SELECT stream_id, status FROM seckill_logs"
                                   " WHERE product_id = $1 AND sale_id = $2", pid, sale,
                                   timeout=timeout)
        ledger.statuses = {r["stream_id"]: r["status"] for r in records}
    return ledger


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
