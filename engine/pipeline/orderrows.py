"""The log stage of a batch: every order's row, with its instance ID, made durable in
`seckill_logs`, the order log (the engine's own logging is `engine.logs`).

We log before we publish so that an instance ID exists in the database before
anyone can provision it.

A batch is first tried as one binary `COPY` straight into `seckill_logs`: the
common case (no order of it logged before) then costs two round trips instead
of five, which is most of the log stage's latency at moderate load. Any unique
violation aborts that COPY as a whole, and the batch takes the careful path:
one transaction with `COPY` into a per-connection staging table, one
`INSERT ... SELECT ... ON CONFLICT DO NOTHING`, and, only when some rows were
not inserted, one query that tells a redelivery (keep the ID logged first)
from a second sale of the same unit of stock (refuse it).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import asyncpg

from engine.connections import PG_ERRORS
from engine.errors import DatabaseFailed, one_line
from engine.pipeline.orders import DATA_ERROR, SLOT_CONFLICT, DeadLetter, Order, order_fields

LOG_TABLE = "seckill_logs"
STAGE_TABLE = "seckill_stage"
STAGE_COLUMNS = ("product_id", "user_id", "instance_id", "stream_id", "sale_id", "slot")

CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (
    product_id BIGINT NOT NULL, user_id BIGINT NOT NULL, instance_id BIGINT NOT NULL,
    stream_id VARCHAR(64) NOT NULL, sale_id VARCHAR(64), slot INTEGER
) ON COMMIT DELETE ROWS
"""

INSERT = f"""
INSERT INTO seckill_logs (product_id, user_id, instance_id, stream_id, sale_id, slot)
SELECT product_id, user_id, instance_id, stream_id, sale_id, slot FROM {STAGE_TABLE}
ON CONFLICT DO NOTHING
"""

# Rows of the stage that are not in the log under their own instance ID: either the
# order was logged before (logged_id) or its unit of stock is held by another order.
RESOLVE = f"""
SELECT s.product_id, s.stream_id, l.instance_id AS logged_id, c.stream_id AS holder
FROM {STAGE_TABLE} s
LEFT JOIN seckill_logs l ON l.product_id = s.product_id AND l.stream_id = s.stream_id
LEFT JOIN seckill_logs c ON c.product_id = s.product_id AND c.sale_id = s.sale_id
     AND c.slot = s.slot AND c.status <> 'FAILED' AND c.stream_id <> s.stream_id
WHERE l.instance_id IS DISTINCT FROM s.instance_id
"""

# Errors that no retry can fix: the batch is split to find the order that causes them
# (struct.error: a number out of its column's range, found while encoding the rows, as
# asyncpg's own encoder raised DataError for it).
DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, struct.error)


@dataclass(slots=True)
class LogResult:
    """What the database made of a batch: orders to publish, orders refused."""

    logged: list[Order] = field(default_factory=list)
    refused: list[DeadLetter] = field(default_factory=list)
    redelivered: int = 0


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Pool `init` hook: every connection gets its own staging table once."""
    await conn.execute(CREATE_STAGE)


def stage_rows(orders: list[Order]) -> list[tuple[int, int, int, str, str | None, int | None]]:
    return [(o.product_id, o.user_id, o.instance_id, o.stream_id, o.sale_id, o.slot)
            for o in orders]


# PostgreSQL's binary COPY: a signature, flags and header extension length, then per row
# the field count and each field as its length (-1: NULL) and bytes, then -1.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
# field count; product_id, user_id, instance_id (BIGINT); the stream ID's length
_ROW_HEAD = struct.Struct(">hiqiqiqi")
_LENGTH = struct.Struct(">i")
_SLOT = struct.Struct(">ii")
_NULL = _LENGTH.pack(-1)


def copy_data(orders: list[Order]) -> bytearray:
    """The batch's rows (`STAGE_COLUMNS`) as one binary COPY stream, byte for byte what
    asyncpg's `copy_records_to_table` sends for `stage_rows(orders)`
    (tests/pipeline/test_orderrows.py), without a record and its codecs per row.
    A bytearray: asyncpg takes it as a buffer (bytes would be taken for a path)."""
    out = bytearray(COPY_HEADER)
    head, length, slot_field = _ROW_HEAD.pack, _LENGTH.pack, _SLOT.pack
    sales: dict[str | None, bytes] = {None: _NULL}
    for o in orders:
        sid = o.stream_id.encode()
        sale = sales.get(o.sale_id)
        if sale is None:
            raw = o.sale_id.encode()  # type: ignore[union-attr]
            sale = sales[o.sale_id] = length(len(raw)) + raw
        out += head(6, 8, o.product_id, 8, o.user_id, 8, o.instance_id, len(sid))
        out += sid
        out += sale
        out += _NULL if o.slot is None else slot_field(4, o.slot)
    out += COPY_TRAILER
    return out


async def write_batch(pool: asyncpg.Pool, orders: list[Order], timeout: float) -> LogResult:
    """Log a batch; on a data error, isolate the offending orders one by one."""
    try:
        return await asyncio.wait_for(_write(pool, orders), timeout)
    except DATA_ERRORS as exc:
        if len(orders) == 1:
            return LogResult(refused=[_refuse(orders[0], DATA_ERROR, one_line(exc))])
    except PG_ERRORS as exc:
        raise DatabaseFailed(f"logging {len(orders)} orders: {one_line(exc)}") from exc
    result = LogResult()
    for order in orders:
        part = await write_batch(pool, [order], timeout)
        result.logged += part.logged
        result.refused += part.refused
        result.redelivered += part.redelivered
    return result


async def _write(pool: asyncpg.Pool, orders: list[Order]) -> LogResult:
    data = copy_data(orders)
    async with pool.acquire() as conn:
        try:
            await conn.copy_to_table(LOG_TABLE, source=data, columns=STAGE_COLUMNS,
                                     format="binary")
            return LogResult(logged=orders)
        except asyncpg.UniqueViolationError:
            pass  # nothing of it was written: a redelivery or a unit sold twice, sort it out
        async with conn.transaction():
            await conn.copy_to_table(STAGE_TABLE, source=data, columns=STAGE_COLUMNS,
                                     format="binary")
            status = await conn.execute(INSERT)
            if int(status.rsplit(" ", 1)[1]) == len(orders):
                return LogResult(logged=orders)
            unresolved = await conn.fetch(RESOLVE)
    return _resolve(orders, unresolved)


def _resolve(orders: list[Order], unresolved: list[asyncpg.Record]) -> LogResult:
    """Apply the RESOLVE rows: take over logged IDs, refuse double-sold units."""
    by_key = {(r["product_id"], r["stream_id"]): r for r in unresolved}
    result = LogResult()
    for order in orders:
        row = by_key.get((order.product_id, order.stream_id))
        if row is None:
            result.logged.append(order)
        elif row["logged_id"] is not None:
            order.instance_id = row["logged_id"]
            result.logged.append(order)
            result.redelivered += 1
        else:
            holder = row["holder"] or "another order of the same batch"
            result.refused.append(_refuse(
                order, SLOT_CONFLICT,
                f"unit {order.slot} of sale {order.sale_id} is already sold to {holder}"))
    return result


def _refuse(order: Order, reason: str, detail: str) -> DeadLetter:
    return DeadLetter(order.stream, order.stream_id, order.product_id, order_fields(order),
                      reason, detail, entry_id=order.entry_id)


