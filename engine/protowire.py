"""Protobuf's wire format, the one piece both hand-built encoders need: the varint.

The engine writes two kinds of protobuf by hand for speed, each checked byte for byte
against generated classes: its events (pipeline/events.py) and its span records'
OTLP requests (tracewire.py). Both write varints; one copy serves them.
"""

from __future__ import annotations

ONE_BYTE = [bytes((i,)) for i in range(128)]  # a varint below 128 is its one byte
_U64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint; a negative int64/int32 as its 64-bit two's complement."""
    if 0 <= value < 0x80:
        return ONE_BYTE[value]
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
