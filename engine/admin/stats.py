"""`seckill stats`: one line per open sale of what an operator asks during a flash sale.

Every order count is scoped to the product's open sale (its `sale_id`), never
summed over earlier sales, and comes from where the order is, not from how
often something was read:

- `logged`, `running`, `failed`: rows of the sale in `seckill_logs` (one per
  order, however often it was redelivered or replayed).
- `accepted`: every order the gate accepted in the sale is, at any moment, in
  exactly one of four places: a row of the sale; unread in the stream (`lag`);
  read but pending without a row yet; or a dead letter without a row. So
  accepted = logged + lag + pending without a row + the sale's dead letters
  without a row. A dead letter that is replayed leaves the dead-letter stream
  as its replay enters the order stream, so it is still counted once (the
  number of stream entries read would count it twice).
- `published`: rows of the sale whose entry is neither pending nor
  dead-lettered. The engine writes the row first and acknowledges the entry
  only after the broker confirmed its INSTANCE_CREATED event, so a row whose
  entry is no longer pending had its event confirmed. (The engine's own
  counter would be exact too, but it is per worker process and lives in the
  supervisor's /metrics, not per sale.)

- `waiting`, `handed_out`, `released`: the sale's waitlist (users waiting now), the
  units handed from it to waiting users, and the releases owners asked for: from
  Redis (`waitlist`, `waitlist-stats`), kept after a close until the next sale.

Limits, both transient: unread and pending entries are taken to belong to
the open sale (one left over from a previous sale's backlog would count), and
a replayed entry that is pending is matched to its row only once acknowledged.

Redis figures come in pipelined round trips, database figures in one query;
a product whose sale is closed shows its stream figures only. `--watch`
redraws; `--json` prints one JSON array per sample for scripts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis import Redis

from engine.config import Settings
from engine.connections import connect_pg, sync_redis
from engine.keys import GROUP, Keys
from engine.sale_figures import SaleFigures, read_figures

# Pending entries and dead letters looked at per product and sample: enough for any
# sale an operator can still read in a terminal, and a bound on a sample's cost.
MAX_LOOKED_AT = 100_000

# Unfinished orders are joined, not tested with `= ANY(array)` per row: a sale can
# have a hundred thousand rows and as many pending entries.
COUNTS = """
SELECT l.product_id, l.status, count(*) AS n,
       count(*) FILTER (WHERE l.created_at > now() - interval '10 seconds') AS recent,
       count(*) FILTER (WHERE u.kind = 'pending') AS pending,
       count(*) FILTER (WHERE u.kind = 'dead') AS dead
FROM seckill_logs AS l
JOIN unnest($1::bigint[], $2::text[]) AS s(product_id, sale_id)
  ON l.product_id = s.product_id AND l.sale_id = s.sale_id
LEFT JOIN unnest($3::bigint[], $4::text[], $5::text[]) AS u(product_id, stream_id, kind)
  ON l.product_id = u.product_id AND l.stream_id = u.stream_id
GROUP BY l.product_id, l.status
"""


@dataclass
class SaleStats:
    product: int
    sale: str | None
    stock: int | None
    accepted: int | None
    logged: int | None
    published: int | None
    running: int | None
    failed: int | None
    lag: int
    pending: int
    dead_letters: int
    orders_per_s: float | None
    waiting: int = 0
    handed_out: int = 0
    released: int = 0


@dataclass(frozen=True, slots=True)
class Unfinished:
    """Orders of one sale that have no acknowledged row: their stream IDs."""

    pending: list[str]
    dead: list[str]  # dead letters of the sale (their order's own stream ID)


@dataclass(slots=True)
class Counts:
    """Rows of one sale by status, and how many of them are not finished."""

    by_status: dict[str, int]
    recent: int
    pending: int  # rows whose entry is still pending
    dead: int  # rows whose order sits in the dead-letter stream

    @property
    def logged(self) -> int:
        return sum(self.by_status.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_unfinished(redis: Redis, keys: Keys, figures: Sequence[SaleFigures]
                    ) -> dict[int, Unfinished]:
    """Pending entry IDs and the open sale's dead letters, per product with an open sale."""
    open_sales = [f for f in figures if f.sale_id is not None]
    pipe = redis.pipeline(transaction=False)
    for f in open_sales:
        pipe.xpending_range(keys.stream(f.product_id), GROUP, "-", "+",
                            min(f.pending, MAX_LOOKED_AT) or 1)
        pipe.xrange(keys.dlq(f.product_id), count=MAX_LOOKED_AT)
    replies = pipe.execute(raise_on_error=False)
    out = {}
    for i, f in enumerate(open_sales):
        pending, letters = replies[2 * i:2 * i + 2]
        out[f.product_id] = Unfinished(
            [_text(p["message_id"]) for p in pending] if isinstance(pending, list) else [],
            [_text(fields.get(b"id", b"")) for _, fields in letters or []
             if _sale_of_letter(fields) == f.sale_id] if isinstance(letters, list) else [])
    return out


def read_waitlists(redis: Redis, keys: Keys, figures: Sequence[SaleFigures]
                   ) -> dict[int, tuple[int, int, int]]:
    """(waiting, handed out, released) per product, in one pipelined round trip."""
    pipe = redis.pipeline(transaction=False)
    for f in figures:
        pipe.zcard(keys.waitlist(f.product_id))
        pipe.hmget(keys.waitlist_stats(f.product_id), "handed", "released")
    replies = pipe.execute()
    out = {}
    for i, f in enumerate(figures):
        handed, released = replies[2 * i + 1]
        out[f.product_id] = (int(replies[2 * i]), int(handed or 0), int(released or 0))
    return out


def _sale_of_letter(fields: dict[bytes, bytes]) -> str | None:
    try:
        original = orjson.loads(fields.get(b"fields", b"{}"))
    except orjson.JSONDecodeError:
        return None
    return original.get("sale") if isinstance(original, dict) else None


async def count_rows(settings: Settings, figures: Sequence[SaleFigures],
                     unfinished: dict[int, Unfinished]) -> dict[int, Counts]:
    """One query: each open sale's rows by status, and which of them are unfinished."""
    scoped = [f for f in figures if f.sale_id is not None]
    if not scoped:
        return {}
    tagged = {(pid, sid): kind for pid, u in unfinished.items()
              for kind in ("dead", "pending") for sid in getattr(u, kind)}
    conn = await connect_pg(settings)
    try:
        rows = await conn.fetch(COUNTS, [f.product_id for f in scoped],
                                [f.sale_id for f in scoped], [pid for pid, _ in tagged],
                                [sid for _, sid in tagged], list(tagged.values()))
    finally:
        await conn.close()
    out = {f.product_id: Counts({}, 0, 0, 0) for f in scoped}
    for r in rows:
        c = out[r["product_id"]]
        c.by_status[r["status"]] = r["n"]
        c.recent += r["recent"]
        c.pending += r["pending"]
        c.dead += r["dead"]
    return out


def sale_stats(f: SaleFigures, counts: Counts | None, unfinished: Unfinished | None
               ) -> SaleStats:
    """One line of the table: the figures of the open sale (stream figures only if none)."""
    if counts is None or unfinished is None:
        return SaleStats(product=f.product_id, sale=f.sale_id, stock=f.stock, accepted=None,
                         logged=None, published=None, running=None, failed=None, lag=f.lag,
                         pending=f.pending, dead_letters=f.dead_letters, orders_per_s=None)
    pending_without_row = max(0, len(unfinished.pending) - counts.pending)
    dead_without_row = max(0, len(unfinished.dead) - counts.dead)
    return SaleStats(
        product=f.product_id, sale=f.sale_id, stock=f.stock,
        accepted=counts.logged + f.lag + pending_without_row + dead_without_row,
        logged=counts.logged, published=counts.logged - counts.pending - counts.dead,
        running=counts.by_status.get("RUNNING", 0), failed=counts.by_status.get("FAILED", 0),
        lag=f.lag, pending=f.pending, dead_letters=f.dead_letters,
        orders_per_s=counts.recent / 10)


async def collect(settings: Settings, redis: Redis) -> list[SaleStats]:
    keys = Keys(settings.key_prefix)
    figures = await asyncio.to_thread(read_figures, redis, keys)
    if not figures:
        return []
    unfinished = await asyncio.to_thread(read_unfinished, redis, keys, figures)
    counts = await count_rows(settings, figures, unfinished)
    waitlists = await asyncio.to_thread(read_waitlists, redis, keys, figures)
    out = []
    for f in figures:
        line = sale_stats(f, counts.get(f.product_id), unfinished.get(f.product_id))
        line.waiting, line.handed_out, line.released = waitlists[f.product_id]
        out.append(line)
    return out


COLUMNS = [("product", 10), ("sale", 18), ("stock", 7), ("accepted", 9), ("logged", 8),
           ("published", 10), ("running", 8), ("failed", 7), ("lag", 7), ("pending", 8),
           ("dead_letters", 13), ("orders_per_s", 13), ("waiting", 8), ("handed_out", 11),
           ("released", 9)]


def table(stats: list[SaleStats]) -> str:
    head = " ".join(f"{name.replace('_', ' '):>{w}}" for name, w in COLUMNS)
    lines = [head, "-" * len(head)]
    for s in stats:
        values: dict[str, Any] = asdict(s)
        cells = []
        for name, width in COLUMNS:
            v = values[name]
            text = "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v}"
            cells.append(f"{text:>{width}}")
        lines.append(" ".join(cells))
    if not stats:
        lines.append("(no sales yet: `seckill sale open --product ID --stock N`)")
    return "\n".join(lines)


async def stats_command(settings: Settings, *, watch: float | None = None,
                        as_json: bool = False) -> int:
    redis = sync_redis(settings, timeout=settings.connect_timeout)
    try:
        while True:
            stats = await collect(settings, redis)
            if as_json:
                print(orjson.dumps([asdict(s) for s in stats]).decode(), flush=True)
            else:
                if watch:
                    sys.stdout.write("\033[H\033[2J")
                    print(time.strftime("%H:%M:%S"), f"(every {watch:g}s, Ctrl-C to stop)")
                print(table(stats), flush=True)
            if not watch:
                return 0
            await asyncio.sleep(watch)
    except KeyboardInterrupt:
        return 0
    finally:
        redis.close()
