"""The publish stage's events: Protobuf bodies built with as little per-order work as
possible, one message per order, and which orders the broker confirmed.

Everything that is the same for every order of a product (name, spec, event
type, product ID) is serialized once and cached; per order only the varying
fields are written, by hand (`encode_tail`), and appended. Protobuf merges
concatenated messages, so the result decodes to exactly the full event. The
hand-built tail is byte for byte what the generated `Event` serializes for the
same fields (tests/pipeline/test_events.py), and it is what the profile asked
for: a generated `Event` built and serialized per order was a tenth of a
worker's CPU. The AMQP frames around the bodies are `engine.amqp.framing`'s.
"""

from __future__ import annotations

import struct

from engine.amqp.publisher import CONFIRMED, Message
from engine.pb import event_pb2
from engine.pipeline.orders import Order
from engine.products import Product
from engine.protowire import ONE_BYTE, varint

Event = event_pb2.Event
INSTANCE_CREATED = event_pb2.INSTANCE_CREATED
TYPE_NAMES = {v.number: v.name for v in event_pb2.EventType.DESCRIPTOR.values}

# Tags (field number << 3 | wire type) of the per-order fields of `Event`.
_INSTANCE_ID, _USER_ID, _TIMESTAMP = b"\x10", b"\x18", b"\x30"  # varints: 2, 3, 6
_STREAM_ID, _SALE_ID, _SLOT = b"\x42", b"\x4a", b"\x50"  # 8, 9 (strings), 10 (varint)
_ONE_BYTE = ONE_BYTE
_TWO = struct.Struct("BB").pack


def product_prefix(product: Product) -> bytes:
    """The serialized part of an INSTANCE_CREATED event shared by all orders of a product."""
    return Event(
        event_type=INSTANCE_CREATED, name=product.name, product_id=product.id,
        spec=event_pb2.InstanceSpec(cpus=product.cpus, memory_mb=product.memory_mb,
                                    gpu=product.gpu, image=product.image),
    ).SerializeToString()


def _string(tag: bytes, text: str) -> bytes:
    raw = text.encode()
    size = len(raw)
    return tag + (_ONE_BYTE[size] if size < 0x80 else varint(size)) + raw


def encode_tail(instance_id: int, user_id: int, timestamp: int, stream_id: str,
                sale_id: str | None, slot: int | None) -> bytes:
    """The per-order fields of an event, as `Event(...).SerializeToString()` writes them:
    in field-number order, proto3 zeros and empty strings left out."""
    parts: list[bytes] = []
    if instance_id:
        parts += (_INSTANCE_ID, varint(instance_id))
    if user_id:
        parts += (_USER_ID, varint(user_id))
    if timestamp:
        parts += (_TIMESTAMP, varint(timestamp))
    if stream_id:
        parts.append(_string(_STREAM_ID, stream_id))
    if sale_id:
        parts.append(_string(_SALE_ID, sale_id))
    if slot:
        parts += (_SLOT, varint(slot))
    return b"".join(parts)


def created_body(prefix: bytes, order: Order, now: int) -> bytes:
    return prefix + encode_tail(order.instance_id, order.user_id, now, order.stream_id,
                                order.sale_id, order.slot)


def build_messages(orders: list[Order], prefixes: dict[int, bytes], now: int) -> list[Message]:
    """The INSTANCE_CREATED event of every order, its instance ID as the message ID."""
    bodies, ids = build_events(orders, prefixes, now)
    return [Message(body, mid) for body, mid in zip(bodies, ids, strict=True)]


def build_events(orders: list[Order], prefixes: dict[int, bytes], now: int
                 ) -> tuple[list[bytes], list[str]]:
    """The INSTANCE_CREATED body of every order and its message ID (the instance ID).

    The same bytes as `created_body` per order, with what is the same for the whole
    batch worked out once: the timestamp's bytes, the high bits of IDs issued in the
    same millisecond, the sale's field.
    """
    stamp = _TIMESTAMP + varint(now) if now else b""
    high: dict[int, bytes] = {}
    sales: dict[str | None, bytes] = {None: b"", "": b""}
    one, two = _ONE_BYTE, _TWO
    bodies = []
    ids = []
    for o in orders:
        iid = o.instance_id
        if iid >> 14 > 0:
            top = high.get(iid >> 14)
            if top is None:
                top = high[iid >> 14] = varint(iid >> 14)
            # the low 14 bits as the varint's first two bytes, continuation bits set
            instance = _INSTANCE_ID + two(iid & 0x7F | 0x80, iid >> 7 & 0x7F | 0x80) + top
        else:
            instance = _INSTANCE_ID + varint(iid) if iid else b""
        uid = o.user_id
        user = (_USER_ID + (one[uid] if 0 < uid < 0x80
                            else two(uid & 0x7F | 0x80, uid >> 7) if 0 < uid < 0x4000
                            else varint(uid))) if uid else b""
        sid = o.stream_id.encode()
        sale = sales.get(o.sale_id)
        if sale is None:
            sale = sales[o.sale_id] = _string(_SALE_ID, o.sale_id)  # type: ignore[arg-type]
        slot = o.slot
        bodies.append(b"".join((
            prefixes[o.product_id], instance, user, stamp,
            (_STREAM_ID + (one[len(sid)] if len(sid) < 0x80 else varint(len(sid))) + sid)
            if sid else b"",
            sale,
            (_SLOT + (one[slot] if 0 < slot < 0x80
                      else two(slot & 0x7F | 0x80, slot >> 7) if 0 < slot < 0x4000
                      else varint(slot))) if slot else b"")))
        ids.append(str(iid))
    return bodies, ids


def sort_confirmed(orders: list[Order], outcomes: list[str]
                   ) -> tuple[list[Order], list[Order], dict[str, int]]:
    """The orders whose event the broker confirmed, the others, and how many of them
    failed for each outcome (counted once per batch, not per order)."""
    if all(outcome == CONFIRMED for outcome in outcomes):
        if len(outcomes) != len(orders):
            raise ValueError(f"{len(outcomes)} outcomes for {len(orders)} orders")
        return orders, [], {}
    confirmed: list[Order] = []
    failed: list[Order] = []
    why: dict[str, int] = {}
    for order, outcome in zip(orders, outcomes, strict=True):
        if outcome == CONFIRMED:
            confirmed.append(order)
        else:
            failed.append(order)
            why[outcome] = why.get(outcome, 0) + 1
    return confirmed, failed, why
