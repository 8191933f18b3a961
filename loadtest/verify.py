"""After a rehearsal: check every invariant of a flash sale; exit non-zero on any violation.

  accepted == min(stock, distinct users who tried); no user accepted twice;
  stock never negative, and 0 when sold out; slots 1..stock each used at most once
  (all of them when sold out); and, once the engine drained: every accepted order
  has exactly one seckill_logs row and its own instance ID, every logged order's
  event reached the exchange (a tap queue bound before the run), and no event of
  the product names an order that was not logged under that instance ID.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from dataclasses import dataclass

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.config import Settings, load_settings
from engine.keys import Keys
from engine.pb import event_pb2

TIMEOUT = 30.0  # seconds any one call to Redis, PostgreSQL or RabbitMQ may take


def tried_key(keys: Keys, pid: int) -> str:
    return f"{keys.prefix}loadtest:{{{pid}}}:tried"


def _text(value: object) -> str:
    """A stream ID or field as text (redis-py gives bytes without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def sale_entries(redis: Redis, keys: Keys, pid: int,
                       sale: str) -> list[tuple[str, dict[bytes | str, bytes | str]]]:
    """The stream entries (ID, fields) the gate wrote for `sale`, oldest first."""
    entries = []
    start = "-"
    while True:
        batch = await redis.xrange(keys.stream(pid), min=start, count=5000)
        if not batch:
            break
        for entry_id, fields in batch:
            fields = fields or {}
            if _text(fields.get(b"sale", b"")) == sale:
                entries.append((_text(entry_id), fields))
        start = "(" + _text(batch[-1][0])
    return entries


async def check_gate(redis: Redis, keys: Keys, pid: int, sale: str, stock: int) -> list[str]:
    problems = []
    entries = await sale_entries(redis, keys, pid, sale)
    tried = await redis.scard(tried_key(keys, pid))
    users = Counter(int(f[b"uid"]) for _, f in entries)
    slots = Counter(int(f[b"slot"]) for _, f in entries)
    left = int(await redis.get(keys.stock(pid)) or 0)
    if len(entries) != min(stock, tried):
        problems.append(f"accepted {len(entries)} != min(stock {stock}, tried {tried})")
    if twice := [u for u, n in users.items() if n > 1]:
        problems.append(f"{len(twice)} users accepted more than once, e.g. {twice[:5]}")
    if left < 0:
        problems.append(f"stock is negative: {left}")
    if len(entries) == stock and left != 0:
        problems.append(f"sold out but stock is {left}")
    if len(entries) != stock - left:
        problems.append(f"stock left {left} does not match {len(entries)} accepted of {stock}")
    if dup := [s for s, n in slots.items() if n > 1]:
        problems.append(f"slots sold twice: {dup[:5]}")
    if bad := [s for s in slots if not 1 <= s <= stock]:
        problems.append(f"slots outside 1..{stock}: {bad[:5]}")
    if len(entries) == stock and set(slots) != set(range(1, stock + 1)):
        problems.append("sold out but not every slot 1..stock was used")
    return problems


@dataclass(frozen=True, slots=True)
class Published:
    """What an INSTANCE_CREATED event on the tap queue says it provisions."""

    product_id: int
    stream_id: str
    instance_id: int


async def check_log(settings: Settings, redis: Redis, keys: Keys, pid: int,
                    sale: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Rows against accepted orders; returns the problems and the rows'
    (stream ID, instance ID) pairs."""
    entries = {sid for sid, _ in await sale_entries(redis, keys, pid, sale)}
    conn = await asyncpg.connect(settings.pg_dsn, timeout=TIMEOUT)
    try:
        rows = await conn.fetch("SELECT stream_id, instance_id FROM seckill_logs "
                                "WHERE product_id = $1 AND sale_id = $2", pid, sale,
                                timeout=TIMEOUT)
    finally:
        await conn.close()
    problems = []
    streams = Counter(r["stream_id"] for r in rows)
    instances = {r["instance_id"] for r in rows}
    if set(streams) != entries:
        problems.append(f"{len(entries - set(streams))} accepted orders have no row, "
                        f"{len(set(streams) - entries)} rows match no accepted order")
    if any(n > 1 for n in streams.values()):
        problems.append("an order has more than one row")
    if len(instances) != len(rows):
        problems.append("two orders share an instance ID")
    return problems, [(r["stream_id"], r["instance_id"]) for r in rows]


def check_events(pid: int, logged: list[tuple[str, int]],
                 published: list[Published]) -> list[str]:
    """Every logged order's event was published; every event of `pid` is a logged order's."""
    problems = []
    if missing := {i for _, i in logged} - {e.instance_id for e in published}:
        problems.append(f"{len(missing)} logged orders' events never reached the exchange")
    orders = dict(logged)
    if strays := [e for e in published
                  if e.product_id == pid and orders.get(e.stream_id) != e.instance_id]:
        problems.append(f"{len(strays)} events match no logged order, e.g. instance "
                        f"{strays[0].instance_id} for entry {strays[0].stream_id!r}")
    return problems


async def drain_tap(settings: Settings, queue: str, timeout: float = 5.0) -> list[Published]:
    """Every INSTANCE_CREATED event that reached the tap queue (none new for `timeout` s).

    Read without acknowledging: the broker puts them back when the connection
    closes, so verifying twice gives the same answer."""
    conn = await asyncio.wait_for(aiormq.connect(settings.amqp_url), TIMEOUT)
    seen: list[Published] = []
    try:
        channel = await conn.channel()
        idle = 0.0
        while idle < timeout:
            message = await channel.basic_get(queue, no_ack=False, timeout=TIMEOUT)
            if not message.body and message.delivery_tag is None:
                await asyncio.sleep(0.1)
                idle += 0.1
                continue
            event = event_pb2.Event.FromString(message.body)
            seen.append(Published(event.product_id, event.stream_id, event.instance_id))
            idle = 0.0
    finally:
        await conn.close()
    return seen


async def verify(settings: Settings, pid: int, sale: str, stock: int, *,
                 engine: bool = False, tap: str | None = None) -> list[str]:
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url, socket_timeout=TIMEOUT,
                           socket_connect_timeout=TIMEOUT)
    try:
        problems = await check_gate(redis, keys, pid, sale, stock)
        if engine:
            log_problems, logged = await check_log(settings, redis, keys, pid, sale)
            problems += log_problems
            if tap:
                problems += check_events(pid, logged, await drain_tap(settings, tap))
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

