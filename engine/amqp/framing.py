"""AMQP 0-9-1 publish frames, pre-encoded per (channel, exchange, routing key, event type).

The publisher frames a whole batch into one write instead of going through
`basic_publish` per event (see `engine.amqp.publisher`); the bytes are identical to
what pamqp would write, which tests/pipeline/test_publisher.py checks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.amqp.topology import CONTENT_TYPE

# A publish is three frames: method (Basic.Publish), content header, body.
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_END = 1, 2, 3, b"\xce"
BASIC_CLASS, PUBLISH_METHOD = 60, 40
# property flags of what we set: content-type, delivery-mode, message-id, timestamp, type,
# and user-id when the publisher names its user (the consumers trust nothing without it)
_FLAGS = (1 << 15) | (1 << 12) | (1 << 7) | (1 << 6) | (1 << 5)
USER_ID_FLAG = 1 << 4
HEADERS_FLAG = 1 << 13  # the headers table: only a sampled order's event carries one
PERSISTENT = 2
_SIZES = struct.Struct(">IHHQH")  # header frame size; class, weight, body size, flags
_SIZE = struct.Struct(">I")
_LENGTH_BYTE = [bytes((i,)) for i in range(256)]


def shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string too long: {len(raw)} bytes")
    return bytes((len(raw),)) + raw


def table(headers: Mapping[str, str]) -> bytes:
    """An AMQP field table of long strings ('S'), as pamqp encodes a dict of str."""
    items = b"".join(shortstr(name) + b"S" + struct.pack(">I", len(raw)) + raw
                     for name, raw in ((k, v.encode()) for k, v in headers.items()))
    return struct.pack(">I", len(items)) + items


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
    user_id: bytes = b""  # encoded short string, or nothing
    flags: int = _FLAGS

    @classmethod
    def create(cls, channel: int, exchange: str, routing_key: str, type_name: str,
               *, mandatory: bool = True, user_id: str = "") -> Framer:
        method = (struct.pack(">HHH", BASIC_CLASS, PUBLISH_METHOD, 0) + shortstr(exchange)
                  + shortstr(routing_key) + bytes((1 if mandatory else 0,)))
        return cls(channel, _frame(FRAME_METHOD, channel, method), shortstr(CONTENT_TYPE),
                   shortstr(type_name), struct.pack(">BH", FRAME_HEADER, channel),
                   shortstr(user_id) if user_id else b"",
                   _FLAGS | USER_ID_FLAG if user_id else _FLAGS)

    def publish(self, body: bytes, message_id: str, timestamp: int,
                type_name: bytes | None = None, headers: bytes = b"") -> bytes:
        """Bytes of one persistent publish, byte-identical to what pamqp would write.

        `type_name` (an encoded short string) overrides the framer's event type;
        `headers` (an encoded `table`) adds the headers property.
        """
        props = (self.content_type + headers + bytes((PERSISTENT,)) + shortstr(message_id)
                 + struct.pack(">Q", timestamp) + (type_name or self.type_name) + self.user_id)
        flags = self.flags | HEADERS_FLAG if headers else self.flags
        header = struct.pack(">HHQH", BASIC_CLASS, 0, len(body), flags) + props
        return b"".join((
            self.method_frame,
            self.header_prefix, struct.pack(">I", len(header)), header, FRAME_END,
            struct.pack(">BHI", FRAME_BODY, self.channel, len(body)), body, FRAME_END,
        ))

    def publish_many(self, bodies: Sequence[bytes], message_ids: Sequence[str],
                     timestamp: int, headers: Mapping[int, bytes] | None = None) -> bytes:
        """`publish` of every (body, message ID), the framer's event type, as one write;
        `headers`: the encoded `table` of those that carry one, by index.

        What is the same for every publish of the batch (the method frame, the fixed
        properties, the timestamp and what follows it up to the body frame's size) is
        encoded once; per publish only the sizes and the message ID are. A publish with
        headers (a sampled order's) is written in its place by the same loop: framed
        apart and joined again, ten of them cost a batch of 1,000 a third more than
        none (a second copy of the whole write).
        """
        lead = self.method_frame + self.header_prefix
        fixed = self.content_type + bytes((PERSISTENT,))
        after_id = (struct.pack(">Q", timestamp) + self.type_name + self.user_id + FRAME_END
                    + struct.pack(">BH", FRAME_BODY, self.channel))
        # header payload: class, weight, body size, flags, properties
        base = 14 + len(fixed) + 1 + 8 + len(self.type_name) + len(self.user_id)
        sizes, size = _SIZES.pack, _SIZE.pack
        flags = self.flags
        parts: list[bytes] = []
        marks = sorted(headers) if headers else ()
        start = 0
        for stop in (*marks, len(bodies)):
            if start or stop < len(bodies):
                run = zip(bodies[start:stop], message_ids[start:stop], strict=True)
            else:
                run = zip(bodies, message_ids, strict=True)
            for body, message_id in run:
                mid = message_id.encode()
                if len(mid) > 255:
                    raise ValueError(f"AMQP short string too long: {len(mid)} bytes")
                blen = len(body)
                parts += (lead, sizes(base + len(mid), BASIC_CLASS, 0, blen, flags), fixed,
                          _LENGTH_BYTE[len(mid)], mid, after_id, size(blen), body, FRAME_END)
            if stop < len(bodies):  # the headers property comes after content-type
                assert headers is not None
                mid, body, extra = message_ids[stop].encode(), bodies[stop], headers[stop]
                if len(mid) > 255:
                    raise ValueError(f"AMQP short string too long: {len(mid)} bytes")
                blen = len(body)
                parts += (lead, sizes(base + len(extra) + len(mid), BASIC_CLASS, 0, blen,
                                      flags | HEADERS_FLAG),
                          self.content_type, extra, fixed[-1:], _LENGTH_BYTE[len(mid)], mid,
                          after_id, size(blen), body, FRAME_END)
            start = stop + 1
        return b"".join(parts)
