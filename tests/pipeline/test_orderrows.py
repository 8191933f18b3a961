"""Stage 3 against the real PostgreSQL: one row per order, first ID wins, no unit sold twice."""

from __future__ import annotations

import asyncpg
import pytest

from engine.pipeline.orderrows import (
    STAGE_COLUMNS,
    STAGE_TABLE,
    copy_data,
    prepare_connection,
    stage_rows,
    write_batch,
)
from engine.pipeline.orders import DATA_ERROR, SLOT_CONFLICT, Order


@pytest.fixture
async def pool(settings):
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=2,
                                     init=prepare_connection)
    yield pool
    await pool.close()


def order(pid: int, n: int, instance_id: int, *, sale: str | None = "s1",
          slot: int | None = None) -> Order:
    return Order(pid, 1000 + n, f"1700000000000-{n}", 1700000000, sale,
                 n if slot is None and sale else slot, b"stream", instance_id)


async def test_batch_is_logged_once(pool, product_id):
    orders = [order(product_id, n, product_id * 10_000 + n) for n in range(1, 101)]
    result = await write_batch(pool, orders, 10)
    assert len(result.logged) == 100 and not result.refused and result.redelivered == 0
    rows = await pool.fetch("SELECT * FROM seckill_logs WHERE product_id = $1", product_id)
    assert len(rows) == 100
    assert {r["status"] for r in rows} == {"PROCESSING"}


async def test_redelivery_keeps_the_first_instance_id(pool, product_id):
    first = [order(product_id, n, product_id * 10_000 + n) for n in range(1, 11)]
    await write_batch(pool, first[:5], 10)
    again = [order(product_id, n, product_id * 10_000 + 500 + n) for n in range(1, 11)]
    result = await write_batch(pool, again, 10)
    assert result.redelivered == 5
    assert [o.instance_id for o in result.logged] == (
        [o.instance_id for o in first[:5]] + [o.instance_id for o in again[5:]])
    count = await pool.fetchval("SELECT count(*) FROM seckill_logs WHERE product_id = $1",
                                product_id)
    assert count == 10


async def test_a_unit_sold_twice_is_refused(pool, product_id):
    await write_batch(pool, [order(product_id, 1, product_id * 10_000 + 1, slot=7)], 10)
    twice = [order(product_id, 2, product_id * 10_000 + 2, slot=7),
             order(product_id, 3, product_id * 10_000 + 3, slot=8),
             order(product_id, 4, product_id * 10_000 + 4, slot=8)]
    result = await write_batch(pool, twice, 10)
    assert [o.stream_id for o in result.logged] == [twice[1].stream_id]
    assert [(d.stream_id, d.reason) for d in result.refused] == [
        (twice[0].stream_id, SLOT_CONFLICT), (twice[2].stream_id, SLOT_CONFLICT)]
    assert "already sold to 1700000000000-1" in result.refused[0].detail
    assert "already sold to 1700000000000-3" in result.refused[1].detail


async def test_hand_entries_without_sale_never_conflict(pool, product_id):
    orders = [order(product_id, n, product_id * 10_000 + n, sale=None) for n in range(1, 4)]
    result = await write_batch(pool, orders, 10)
    assert len(result.logged) == 3 and not result.refused


async def test_a_data_error_isolates_the_bad_order(pool, product_id):
    good = order(product_id, 1, product_id * 10_000 + 1)
    bad = order(product_id, 2, product_id * 10_000 + 2)
    bad.stream_id = "x" * 65  # longer than the column: only this order can never be logged
    result = await write_batch(pool, [good, bad], 10)
    assert [o.stream_id for o in result.logged] == [good.stream_id]
    assert [d.reason for d in result.refused] == [DATA_ERROR]


async def asyncpg_copy_stream(conn: asyncpg.Connection, rows: list[tuple]) -> bytes:
    """The COPY data asyncpg itself sends for `rows` (its CopyData messages' payloads),
    caught on the connection's transport while it copies them into the staging table."""
    sent: list[bytes] = []
    transport = conn._transport  # noqa: SLF001 - the one place the bytes go through
    write = transport.write
    transport.write = lambda data: (sent.append(bytes(data)), write(data))[1]
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=STAGE_COLUMNS)
    finally:
        del transport.write
    wire, out, at = b"".join(sent), bytearray(), 0
    while at < len(wire):  # frontend messages: type byte, int32 length (with itself), body
        size = int.from_bytes(wire[at + 1:at + 5], "big")
        if wire[at:at + 1] == b"d":
            out += wire[at + 5:at + 1 + size]
        at += 1 + size
    return bytes(out)


ROW_CASES = [
    order(10**9 + 7, 1, 2**62 + 12345),
    order(10**9 + 7, 2, 1, sale=None),  # NULL sale and slot
    Order(2**63 - 1, 2**63 - 1, "9999999999999-99999", 0, "é-sale", 2**31 - 1, b"s", 2**63 - 1),
    Order(1, 1, "", 0, "", 0, b"s", 0),  # empty strings are not NULLs
]


async def test_copy_data_is_asyncpgs_encoding_byte_for_byte(pool):
    async with pool.acquire() as conn:
        expected = await asyncpg_copy_stream(conn, stage_rows(ROW_CASES))
    assert bytes(copy_data(ROW_CASES)) == expected
    assert copy_data(ROW_CASES[:1]) != copy_data([order(10**9 + 7, 1, 2**62 + 12346)])


async def test_a_number_out_of_its_column_is_a_data_error(pool, product_id):
    good = order(product_id, 1, product_id * 10_000 + 1)
    bad = order(product_id, 2, product_id * 10_000 + 2, slot=2**31)  # beyond INTEGER
    result = await write_batch(pool, [good, bad], 10)
    assert [o.stream_id for o in result.logged] == [good.stream_id]
    assert [d.reason for d in result.refused] == [DATA_ERROR]
