"""After a rehearsal: check every invariant of a flash sale; exit non-zero on any violation.

  accepted == min(stock, distinct users who tried); no user accepted twice;
  stock never negative, and 0 when sold out; slots 1..stock each used at most once
  (all of them when sold out); and, once the engine drained: every accepted order
  has exactly one seckill_logs row and its own instance ID, every logged order's
  event reached the exchange (a tap queue bound before the run), and no event of
  the product names an order that was not logged under that instance ID.

  With units given back (failed orders, releases) and handed to the waitlist: units in
  stock + units held by orders = stock (every returned unit made exactly one new order
  or one unit of stock), and, with the rows, units in stock + live orders = stock; no
  user holds two live orders; a slot passes on only once given back; units left the
  waitlist in join order (engine.testing.invariants.ledger_problems).

The checks are engine.testing.invariants', the ones the fault scoreboard and the
tests use; this module reads what the rehearsal left for them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
from redis.asyncio import Redis

from engine.config import Settings, load_settings
from engine.keys import Keys
from engine.testing.invariants import (
    Accepted,
    Event,
    check,
    gate_problems,
    ledger_problems,
    read_ledger,
    read_rows,
)
from engine.testing.taps import EventTap

TIMEOUT = 30.0  # seconds any one call to Redis, PostgreSQL or RabbitMQ may take


def tried_key(keys: Keys, pid: int) -> str:
    return f"{keys.prefix}loadtest:{{{pid}}}:tried"


def _text(value: object) -> str:
    """A stream ID or field as text (redis-py gives bytes without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def sale_entries(redis: Redis, keys: Keys, pid: int, sale: str) -> list[Accepted]:
    """The orders the gate wrote to the stream for `sale`, oldest first."""
    entries = []
    start = "-"
    while True:
        batch = await redis.xrange(keys.stream(pid), min=start, count=5000)
        if not batch:
            break
        for entry_id, fields in batch:
            fields = fields or {}
            if _text(fields.get(b"sale", b"")) == sale:
                entries.append(Accepted(pid, _text(entry_id), sale, int(fields[b"slot"]),
                                        int(fields[b"uid"])))
        start = "(" + _text(batch[-1][0])
    return entries


async def check_gate(redis: Redis, keys: Keys, pid: int, sale: str, stock: int) -> list[str]:
    """The gate's counters against the orders it wrote; once a unit went back (and maybe
    on to a waiting user), the sale's ledger instead (`check_units`): more orders than
    stock, and a slot taken twice, are then what should happen."""
    accepted = await sale_entries(redis, keys, pid, sale)
    if await redis.scard(keys.refunded(pid)):
        return []
    tried = await redis.scard(tried_key(keys, pid))
    left = int(await redis.get(keys.stock(pid)) or 0)
    return gate_problems(accepted, stock=stock, tried=tried, left=left)


async def check_units(settings: Settings, redis: Redis, keys: Keys, pid: int, sale: str,
                      stock: int, *, rows: bool) -> list[str]:
    """The sale's units, the live orders and the waitlist's order; with `rows`, against
    the states of the logged orders too."""
    conn = await asyncpg.connect(settings.pg_dsn, timeout=TIMEOUT) if rows else None
    try:
        ledger = await read_ledger(redis, keys, pid, sale, stock, conn=conn, timeout=TIMEOUT)
    finally:
        if conn is not None:
            await conn.close()
    return ledger_problems(ledger)


async def check_engine(settings: Settings, redis: Redis, keys: Keys, pid: int, sale: str,
                       tap: str | None) -> list[str]:
    """Rows (and, with a tap, events) against the accepted orders."""
    accepted = await sale_entries(redis, keys, pid, sale)
    conn = await asyncpg.connect(settings.pg_dsn, timeout=TIMEOUT)
    try:
        rows = await read_rows(conn, [pid], sale, timeout=TIMEOUT)
    finally:
        await conn.close()
    events = None
    if tap:  # the tap takes every product's events: this product's are checked
        published = await EventTap(settings.amqp_url, queue=tap).peek()
        events = [Event.of(e) for e in published if e.product_id == pid]
    return check(accepted, rows, events).problems()


async def verify(settings: Settings, pid: int, sale: str, stock: int, *,
                 engine: bool = False, tap: str | None = None) -> list[str]:
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url, socket_timeout=TIMEOUT,
                           socket_connect_timeout=TIMEOUT)
    try:
        problems = await check_gate(redis, keys, pid, sale, stock)
        if engine:
            problems += await check_engine(settings, redis, keys, pid, sale, tap)
        problems += await check_units(settings, redis, keys, pid, sale, stock, rows=engine)
    finally:
        await redis.aclose()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.verify", description=__doc__)
    parser.add_argument("--product", type=int, required=True)
    parser.add_argument("--sale", required=True)
    parser.add_argument("--stock", type=int, required=True)
    parser.add_argument("--engine", action="store_true", help="also check rows and events")
    parser.add_argument("--tap", help="queue bound to instance.created before the run")
    args = parser.parse_args(argv)
    problems = asyncio.run(verify(load_settings(), args.product, args.sale, args.stock,
                                  engine=args.engine, tap=args.tap))
    return report(problems)


def report(problems: list[str]) -> int:
    for p in problems:
        print(f"VIOLATION: {p}")
    print("verifier: all invariants hold" if not problems else
          f"verifier: {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
