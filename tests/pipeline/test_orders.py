"""Stage 1 (decoding stream entries) is pure logic: no services needed."""

from __future__ import annotations

import pytest

from engine.keys import Keys
from engine.pipeline.orders import (
    BAD_ENTRY,
    OVERSIZED,
    DeadLetter,
    Entry,
    Order,
    _decode_carefully,
    decode_batch,
    decode_entry,
    entry_ms,
    split,
)

S = b"stream:seckill:{1001}"


def decode(fields: dict[bytes, bytes], pid: int | None = 1001, sid: str = "1700000000000-0"):
    return decode_entry(S, pid, sid, fields, 4096)


def test_gate_entry_decodes() -> None:
    o = decode({b"uid": b"123", b"ts": b"1234567890", b"sale": b"abc-1", b"slot": b"7"})
    assert isinstance(o, Order)
    assert (o.product_id, o.user_id, o.ts, o.sale_id, o.slot) == (1001, 123, 1234567890,
                                                                  "abc-1", 7)


def test_seed_hand_entry_decodes_without_sale() -> None:
    o = decode({b"uid": b"123", b"ts": b"1234567890"})
    assert isinstance(o, Order) and o.sale_id is None and o.slot is None


def test_missing_ts_takes_entry_time() -> None:
    o = decode({b"uid": b"5"}, sid="1700000000123-4")
    assert isinstance(o, Order) and o.ts == 1700000000


@pytest.mark.parametrize("fields,detail", [
    ({}, "uid missing"),
    ({b"uid": b"abc"}, "uid is not a positive int64"),
    ({b"uid": b"0"}, "uid is not a positive int64"),
    ({b"uid": b"-1"}, "uid is not a positive int64"),
    ({b"uid": b"9223372036854775808"}, "uid is not a positive int64"),
    ({b"uid": b"1", b"ts": b"x"}, "ts is not a unix time in seconds"),
    ({b"uid": b"1", b"sale": b"s"}, "sale and slot must come together"),
    ({b"uid": b"1", b"sale": b"s", b"slot": b"0"}, "slot is not a positive int32"),
    ({b"uid": b"1", b"sale": b"s", b"slot": b"2147483648"}, "slot is not a positive int32"),
    ({b"uid": b"1", b"sale": b"x" * 65, b"slot": b"1"}, "sale is not a sale ID"),
])
def test_malformed_entries_become_dead_letters(fields: dict, detail: str) -> None:
    d = decode(fields)
    assert isinstance(d, DeadLetter)
    assert (d.reason, d.detail) == (BAD_ENTRY, detail)
    assert d.fields == fields


def test_oversized_entry() -> None:
    d = decode({b"uid": b"1", b"junk": b"x" * 5000})
    assert isinstance(d, DeadLetter) and d.reason == OVERSIZED


def test_stream_without_product() -> None:
    d = decode({b"uid": b"1"}, pid=None)
    assert isinstance(d, DeadLetter) and d.reason == BAD_ENTRY


def test_entry_ms() -> None:
    assert entry_ms("1700000000123-4") == 1700000000123
    assert entry_ms("garbage") == 0


def test_split_and_batch_decode_keep_order() -> None:
    keys = Keys("p:")
    stream = keys.stream(42).encode()
    entries = [Entry(stream, f"1-{i}", {b"uid": str(i).encode()}) for i in range(1, 4)]
    entries.insert(1, Entry(stream, "1-9", {b"uid": b"bad"}))
    entries.append(Entry(b"p:other", "1-10", {b"uid": b"1"}))
    orders, dead = decode_batch(entries, keys, 4096)
    assert [o.user_id for o in orders] == [1, 2, 3]
    assert {o.product_id for o in orders} == {42}
    assert [d.stream_id for d in dead] == ["1-9", "1-10"]
    assert split([]) == ([], [])


def test_keys_product_of_stream() -> None:
    keys = Keys("t:")
    assert keys.product_of_stream(keys.stream(1001)) == 1001
    assert keys.product_of_stream(keys.dlq(1001)) is None
    assert keys.product_of_stream("stream:seckill:{1001}") is None
    assert Keys().product_of_stream("stream:seckill:{1001}") == 1001
    assert Keys().product_of_stream("stream:seckill:{abc}") is None


def test_replayed_entry_keeps_its_first_stream_id() -> None:
    o = decode({b"uid": b"1", b"orig": b"1699999999999-3"}, sid="1700000000000-0")
    assert isinstance(o, Order)
    assert (o.stream_id, o.entry_id) == ("1699999999999-3", "1700000000000-0")
    d = decode({b"uid": b"1", b"orig": b"nope"})
    assert isinstance(d, DeadLetter) and d.detail == "orig is not a stream entry ID"
    d = decode({b"uid": b"x", b"orig": b"1-1"}, sid="2-2")
    assert isinstance(d, DeadLetter) and (d.stream_id, d.entry_id) == ("1-1", "2-2")


def test_order_fields_round_trip() -> None:
    from engine.pipeline.orders import order_fields

    fields = {b"uid": b"9", b"ts": b"5", b"sale": b"s", b"slot": b"3", b"orig": b"1-1"}
    o = decode(fields, sid="2-2")
    assert isinstance(o, Order) and order_fields(o) == fields


VARIANTS = {
    b"uid": [b"1", b"123", b"0", b"-1", b"9223372036854775807", b"9223372036854775808",
             b"1" * 20, b"", b"x1", None],
    b"ts": [b"1700000000", b"1" * 12, b"1" * 13, b"", b"-5", None],
    b"sale": [b"s-1", b"x" * 64, b"x" * 65, b"", "é".encode(), None],
    b"slot": [b"7", b"2147483647", b"2147483648", b"0", b"00000000001", b"", None],
    b"orig": [None, b"1-1", b"bad"],
    b"from": [None, b"waitlist"],
}


def test_the_quick_path_decides_as_the_careful_one() -> None:
    """Every mix of good and bad values (and unknown extra fields) gets the same order or
    the same dead letter from `decode_entry` as from the careful path alone."""
    import itertools
    names = list(VARIANTS)
    for values in itertools.product(*VARIANTS.values()):
        fields = {k: v for k, v in zip(names, values, strict=True) if v is not None}
        for pid, sid, limit in ((1001, "1700000000000-0", 4096), (None, "1-1", 4096),
                                (1001, "1-" + "9" * 70, 4096), (1001, "1-1", 40),
                                (1001, "1-1", 118), (1001, "1-1", 117)):
            assert decode_entry(S, pid, sid, fields, limit) == \
                _decode_carefully(S, pid, sid, fields, limit), (fields, pid, sid, limit)


def test_a_batch_decodes_as_its_entries_one_by_one() -> None:
    """`decode_batch` takes the common entry its own way, checking a batch's repeated sale
    IDs and timestamps once: every mix, in one batch and again (the cached values), gives
    what `decode_entry` gives each entry alone, in the same order."""
    import itertools
    keys = Keys("test:")
    stream = keys.stream(1001).encode()
    names = [k for k in VARIANTS if k not in (b"orig", b"from")]
    entries = []
    for n, values in enumerate(itertools.product(*(VARIANTS[k] for k in names))):
        fields = {k: v for k, v in zip(names, values, strict=True) if v is not None}
        entries.append(Entry(stream, f"1700000000000-{n}", fields))
    entries += [Entry(stream, "1-" + "9" * 70, entries[0].fields),
                Entry(b"nothing", "1-1", entries[0].fields)]
    for limit in (4096, 117, 118):
        batch = entries + entries
        alone = [decode_entry(e.stream, keys.product_of_stream(e.stream.decode()), e.stream_id,
                              e.fields, limit) for e in batch]
        assert decode_batch(batch, keys, limit) == split(alone), limit


def test_a_batch_names_the_entries_it_did_not_take_as_the_common_one() -> None:
    """Only those can carry a field beyond the gate's four (a sampled order's trace
    context): the engine looks for one there alone, so none may be missing."""
    keys = Keys("test:")
    stream = keys.stream(1001).encode()
    common = {b"uid": b"7", b"ts": b"1700000000", b"sale": b"s", b"slot": b"1"}
    batch = [Entry(stream, "1700000000000-0", common),
             Entry(stream, "1700000000000-1", {**common, b"tp": b"00-context"}),
             Entry(stream, "1700000000000-2", {b"uid": b"0", b"ts": b"1", b"sale": b"s",
                                               b"slot": b"1"}),  # a dead letter
             Entry(stream, "1700000000000-3", common),
             Entry(stream, "1700000000000-4", {b"uid": b"8", b"ts": b"1700000000",
                                               b"tp": b"00-context"}),  # no sale
             Entry(b"nothing", "1-1", common)]
    others: list[int] = []
    orders, dead = decode_batch(batch, keys, 4096, others)
    assert others == [1, 2, 4, 5]
    assert [batch[i].stream_id for i in others if b"tp" in batch[i].fields] == \
        ["1700000000000-1", "1700000000000-4"]
    assert (orders, dead) == decode_batch(batch, keys, 4096)
