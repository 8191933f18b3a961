"""Protobuf events and their AMQP framing, built with as little per-order work as possible.

Everything that is the same for every order of a product (name, spec, event
type, product ID) is serialized once and cached; per order only the varying
fields are encoded and appended. Protobuf merges concatenated messages, so
the result decodes to exactly the full event.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from engine.keys import CONTENT_TYPE
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


# -- AMQP 0-9-1 framing --------------------------------------------------------
# A publish is three frames: method (Basic.Publish), content header, body.
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_END = 1, 2, 3, b"\xce"
BASIC_CLASS, PUBLISH_METHOD = 60, 40
# property flags of what we set: content-type, delivery-mode, message-id, timestamp, type
_FLAGS = (1 << 15) | (1 << 12) | (1 << 7) | (1 << 6) | (1 << 5)
PERSISTENT = 2


def shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string too long: {len(raw)} bytes")
    return bytes((len(raw),)) + raw


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


@dataclass(frozen=True, slots=True)
class Framer:
    """Pre-encoded frames of one (channel, exchange, routing key, event type)."""

    channel: int
    method_frame: bytes
    content_type: bytes
    type_name: bytes
    header_prefix: bytes

    @classmethod
    def create(cls, channel: int, exchange: str, routing_key: str, type_name: str,
               *, mandatory: bool = True) -> Framer:
        method = (struct.pack(">HHH", BASIC_CLASS, PUBLISH_METHOD, 0) + shortstr(exchange)
                  + shortstr(routing_key) + bytes((1 if mandatory else 0,)))
        return cls(channel, _frame(FRAME_METHOD, channel, method), shortstr(CONTENT_TYPE),
                   shortstr(type_name), struct.pack(">BH", FRAME_HEADER, channel))

    def publish(self, body: bytes, message_id: str, timestamp: int,
                type_name: bytes | None = None) -> bytes:
        """Bytes of one persistent publish, byte-identical to what pamqp would write.

        `type_name` (an encoded short string) overrides the framer's event type.
        """
        props = (self.content_type + bytes((PERSISTENT,)) + shortstr(message_id)
                 + struct.pack(">Q", timestamp) + (type_name or self.type_name))
        header = struct.pack(">HHQH", BASIC_CLASS, 0, len(body), _FLAGS) + props
        return b"".join((
            self.method_frame,
            self.header_prefix, struct.pack(">I", len(header)), header, FRAME_END,
            struct.pack(">BHI", FRAME_BODY, self.channel, len(body)), body, FRAME_END,
        ))


def now_s() -> int:
    return int(time.time())
