"""The publish stage's events: Protobuf bodies built with as little per-order work as
possible, one message per order, and which orders the broker confirmed.

Everything that is the same for every order of a product (name, spec, event
type, product ID) is serialized once and cached; per order only the varying
fields are encoded and appended. Protobuf merges concatenated messages, so
the result decodes to exactly the full event. The AMQP frames around them are
`engine.amqp.framing`'s.
"""

from __future__ import annotations

from engine.amqp.publisher import CONFIRMED, Message
from engine.pb import event_pb2
from engine.pipeline.orders import Order
from engine.products import Product

Event = event_pb2.Event
INSTANCE_CREATED = event_pb2.INSTANCE_CREATED
TYPE_NAMES = {v.number: v.name for v in event_pb2.EventType.DESCRIPTOR.values}


def product_prefix(product: Product) -> bytes:
    """The serialized part of an INSTANCE_CREATED event shared by all orders of a product."""
    return Event(
        event_type=INSTANCE_CREATED, name=product.name, product_id=product.id,
        spec=event_pb2.InstanceSpec(cpus=product.cpus, memory_mb=product.memory_mb,
                                    gpu=product.gpu, image=product.image),
    ).SerializeToString()


def created_body(prefix: bytes, order: Order, now: int) -> bytes:
    tail = Event(instance_id=order.instance_id, user_id=order.user_id, timestamp=now,
                 stream_id=order.stream_id, sale_id=order.sale_id or "",
                 slot=order.slot or 0).SerializeToString()
    return prefix + tail


def build_messages(orders: list[Order], prefixes: dict[int, bytes], now: int) -> list[Message]:
    """The INSTANCE_CREATED event of every order, its instance ID as the message ID."""
    return [Message(created_body(prefixes[o.product_id], o, now), str(o.instance_id))
            for o in orders]


def sort_confirmed(orders: list[Order], outcomes: list[str]
                   ) -> tuple[list[Order], list[Order], dict[str, int]]:
    """The orders whose event the broker confirmed, the others, and how many of them
    failed for each outcome (counted once per batch, not per order)."""
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
