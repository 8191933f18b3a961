"""The decode stage of a batch: stream entries in, valid orders and dead letters out,
and the types every later stage passes on (`Entry`, `Order`, `DeadLetter`).

A malformed entry must never crash a worker or hold up the good orders read
with it, so decoding never raises: every entry becomes either an `Order` or
a `DeadLetter` carrying the raw fields and the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.keys import Keys

MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
MAX_FIELDS = 16
MAX_TEXT = 64
# the most bytes uid, ts, sale and slot can hold once each has passed its own check
_MAX_FOUR_FIELDS = len(b"uidtssaleslot") + 19 + 12 + MAX_TEXT + 10

# Reasons, as they appear in the `reason` field of a dead letter.
BAD_ENTRY = "bad_entry"
OVERSIZED = "oversized"
UNKNOWN_PRODUCT = "unknown_product"
SLOT_CONFLICT = "slot_conflict"
DATA_ERROR = "data_error"
TOO_MANY_DELIVERIES = "too_many_deliveries"

Fields = dict[bytes, bytes]


class Entry(NamedTuple):
    """A stream entry as read: stream key, entry ID, raw fields (a tuple: one is made
    per order read, and a frozen dataclass costs three times as much to make)."""

    stream: bytes
    stream_id: str
    fields: Fields


@dataclass(slots=True)
class Order:
    """One purchase read from a stream, valid and ready for an instance ID."""

    product_id: int
    user_id: int
    stream_id: str
    ts: int
    sale_id: str | None
    slot: int | None
    stream: bytes  # the Redis key it was read from, for XACK
    instance_id: int = 0
    entry_id: str = ""  # the entry to acknowledge; differs from stream_id for a replay

    def __post_init__(self) -> None:
        if not self.entry_id:
            self.entry_id = self.stream_id


@dataclass(slots=True)
class DeadLetter:
    """An entry that will never succeed, acknowledged and set aside with its reason."""

    stream: bytes
    stream_id: str
    product_id: int | None
    fields: Fields
    reason: str
    detail: str
    extra: dict[str, str] = field(default_factory=dict)
    entry_id: str = ""  # the entry to acknowledge; stream_id is the order's own ID

    def __post_init__(self) -> None:
        if not self.entry_id:
            self.entry_id = self.stream_id


def entry_ms(stream_id: str) -> int:
    """The creation time (unix ms) Redis encoded in an auto-generated entry ID."""
    head, _, _ = stream_id.partition("-")
    return int(head) if head.isdigit() else 0


def is_stream_id(raw: bytes) -> bool:
    ms, dash, seq = raw.partition(b"-")
    return bool(dash) and ms.isdigit() and seq.isdigit() and len(raw) <= MAX_TEXT


def _positive(raw: bytes | None, limit: int) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 19:
        return None
    value = int(raw)
    return value if 0 < value <= limit else None


def decode_entry(stream: bytes, product_id: int | None, stream_id: str, fields: Fields,
                 max_bytes: int) -> Order | DeadLetter:
    """Validate one entry's fields; the reason names exactly what is wrong.

    The common entry (uid, ts, sale and slot all well formed, no `orig`) is taken in
    a few checks; anything else goes through `_decode_carefully`, which names the fault.
    """
    get = fields.get
    uid, raw_ts, raw_sale, raw_slot = get(b"uid"), get(b"ts"), get(b"sale"), get(b"slot")
    if (product_id is not None and uid is not None and raw_ts is not None
            and raw_sale is not None and raw_slot is not None and b"orig" not in fields
            and len(fields) <= MAX_FIELDS and uid.isdigit() and len(uid) <= 19
            and raw_ts.isdigit() and len(raw_ts) <= 12 and raw_slot.isdigit()
            and len(raw_slot) <= 10 and 0 < len(raw_sale) <= MAX_TEXT and raw_sale.isascii()
            and len(stream_id) <= MAX_TEXT
            and (len(fields) == 4 and max_bytes >= _MAX_FOUR_FIELDS
                 or sum(map(len, fields)) + sum(map(len, fields.values())) <= max_bytes)):
        user_id, slot = int(uid), int(raw_slot)
        if 0 < user_id <= MAX_INT64 and 0 < slot <= MAX_INT32:
            return Order(product_id, user_id, stream_id, int(raw_ts), raw_sale.decode(), slot,
                         stream, 0, stream_id)
    return _decode_carefully(stream, product_id, stream_id, fields, max_bytes)


def _decode_carefully(stream: bytes, product_id: int | None, stream_id: str, fields: Fields,
                      max_bytes: int) -> Order | DeadLetter:
    def dead(reason: str, detail: str) -> DeadLetter:
        orig = fields.get(b"orig")
        order_id = orig.decode() if orig is not None and is_stream_id(orig) else stream_id
        return DeadLetter(stream, order_id, product_id, fields, reason, detail,
                          entry_id=stream_id)

    if product_id is None:
        return dead(BAD_ENTRY, "stream key does not name a product")
    size = sum(len(k) + len(v) for k, v in fields.items())
    if size > max_bytes or len(fields) > MAX_FIELDS:
        return dead(OVERSIZED, f"entry has {len(fields)} fields, {size} bytes; limit {max_bytes}")
    uid = fields.get(b"uid")
    user_id = _positive(uid, MAX_INT64)
    if user_id is None:
        return dead(BAD_ENTRY, "uid missing" if uid is None else "uid is not a positive int64")
    raw_ts = fields.get(b"ts")
    if raw_ts is None:
        ts = entry_ms(stream_id) // 1000
    elif raw_ts.isdigit() and len(raw_ts) <= 12:
        ts = int(raw_ts)
    else:
        return dead(BAD_ENTRY, "ts is not a unix time in seconds")
    raw_sale = fields.get(b"sale")
    raw_slot = fields.get(b"slot")
    if (raw_sale is None) != (raw_slot is None):
        return dead(BAD_ENTRY, "sale and slot must come together")
    sale_id = slot = None
    if raw_sale is not None:
        if not raw_sale or len(raw_sale) > MAX_TEXT or not raw_sale.isascii():
            return dead(BAD_ENTRY, "sale is not a sale ID")
        sale_id = raw_sale.decode()
        slot = _positive(raw_slot, MAX_INT32)
        if slot is None:
            return dead(BAD_ENTRY, "slot is not a positive int32")
    if len(stream_id) > MAX_TEXT:
        return dead(BAD_ENTRY, "stream ID too long")
    orig = fields.get(b"orig")  # a dead letter replayed: the order keeps its first ID
    if orig is not None:
        if not is_stream_id(orig):
            return dead(BAD_ENTRY, "orig is not a stream entry ID")
        return Order(product_id, user_id, orig.decode(), ts, sale_id, slot, stream,
                     entry_id=stream_id)
    return Order(product_id, user_id, stream_id, ts, sale_id, slot, stream)


def decode_batch(entries: list[Entry], keys: Keys, max_bytes: int,
                 others: list[int] | None = None) -> tuple[list[Order], list[DeadLetter]]:
    """Every entry of a batch decoded: valid orders, and dead letters.

    The gate's common entry (exactly uid, ts, sale and slot) is taken here, with what a
    batch repeats (its sales' IDs, its few timestamps) checked and converted once per
    distinct value; anything else is `decode_entry`'s, which decides the same
    (tests/pipeline/test_orders.py holds the two equal). `others` (when given) gets
    the places in `entries` of those that were not the common entry: only there can
    a field beyond the four be (a sampled order's trace context, engine.pipeline.
    ordertrace), so nobody looks through the whole batch for one again.
    """
    product_of: dict[bytes, int | None] = {}
    sales: dict[bytes | None, str] = {}  # raw sale ID -> decoded; only valid ones
    stamps: dict[bytes | None, int] = {}  # raw ts -> seconds; only valid ones
    orders: list[Order] = []
    dead: list[DeadLetter] = []
    four_fit = max_bytes >= _MAX_FOUR_FIELDS
    for stream, stream_id, fields in entries:
        pid = product_of.get(stream, -1)
        if pid == -1:
            pid = product_of[stream] = keys.product_of_stream(stream.decode())
        if pid is not None and four_fit and len(fields) == 4 and len(stream_id) <= MAX_TEXT:
            get = fields.get
            uid, raw_slot, raw_sale, raw_ts = get(b"uid"), get(b"slot"), get(b"sale"), get(b"ts")
            sale = sales.get(raw_sale)
            if sale is None and raw_sale is not None and 0 < len(raw_sale) <= MAX_TEXT \
                    and raw_sale.isascii():
                sale = sales[raw_sale] = raw_sale.decode()
            ts = stamps.get(raw_ts)
            if ts is None and raw_ts is not None and raw_ts.isdigit() and len(raw_ts) <= 12:
                ts = stamps[raw_ts] = int(raw_ts)
            if (sale is not None and ts is not None and uid is not None and raw_slot is not None
                    and uid.isdigit() and len(uid) <= 19 and raw_slot.isdigit()
                    and len(raw_slot) <= 10):
                user_id, slot = int(uid), int(raw_slot)
                if 0 < user_id <= MAX_INT64 and 0 < slot <= MAX_INT32:
                    orders.append(Order(pid, user_id, stream_id, ts, sale, slot, stream, 0,
                                        stream_id))
                    continue
        if others is not None:  # (each entry before it made one order or dead letter)
            others.append(len(orders) + len(dead))
        item = decode_entry(stream, pid, stream_id, fields, max_bytes)
        (orders if type(item) is Order else dead).append(item)  # type: ignore[arg-type]
    return orders, dead


def split(decoded: list[Order | DeadLetter]) -> tuple[list[Order], list[DeadLetter]]:
    orders: list[Order] = []
    dead: list[DeadLetter] = []
    for item in decoded:
        (orders if type(item) is Order else dead).append(item)  # type: ignore[arg-type]
    return orders, dead


def order_fields(order: Order) -> Fields:
    """The fields of an order as the gate wrote them, for a dead letter that can be replayed."""
    fields = {b"uid": str(order.user_id).encode(), b"ts": str(order.ts).encode()}
    if order.sale_id is not None:
        fields[b"sale"] = order.sale_id.encode()
        fields[b"slot"] = str(order.slot).encode()
    if order.entry_id != order.stream_id:
        fields[b"orig"] = order.stream_id.encode()
    return fields


def ids_by_stream(items: Iterable[Order | DeadLetter | Entry]) -> dict[bytes, list[str]]:
    """The entry IDs of `items`, by stream: what XACK, XCLAIM and the error hashes take."""
    by_stream: dict[bytes, list[str]] = defaultdict(list)
    for item in items:
        if type(item) is Order:
            by_stream[item.stream].append(item.entry_id)
        else:
            by_stream[item.stream].append(getattr(item, "entry_id", None) or item.stream_id)
    return by_stream
