"""`seckill stats`: one line per sale of what an operator asks during a flash sale.

Stock left, accepted, logged, published, running, failed, lag, pending, dead
letters and orders per second: Redis figures in one pipelined round trip,
database figures in one GROUP BY. `--watch` redraws; `--json` is for scripts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis import Redis

from .config import Settings
from .connections import connect_pg
from .keys import Keys
from .streamstats import read_figures

COUNTS = """
SELECT product_id, status, count(*) AS n,
       count(*) FILTER (WHERE created_at > now() - interval '10 seconds') AS recent
FROM seckill_logs WHERE product_id = ANY($1::bigint[]) GROUP BY product_id, status
"""


@dataclass
class SaleStats:
    product: int
    sale: str | None
    stock: int | None
    accepted: int
    logged: int
    published: int
    running: int
    failed: int
    lag: int
    pending: int
    dead_letters: int
    orders_per_s: float


async def collect(settings: Settings, redis: Redis) -> list[SaleStats]:
    figures = await asyncio.to_thread(read_figures, redis, Keys(settings.key_prefix))
    if not figures:
        return []
    conn = await connect_pg(settings)
    try:
        rows = await conn.fetch(COUNTS, [f.product_id for f in figures])
    finally:
        await conn.close()
    by_product: dict[int, dict[str, tuple[int, int]]] = {}
    for r in rows:
        by_product.setdefault(r["product_id"], {})[r["status"]] = (r["n"], r["recent"])
    out = []
    for f in figures:
        counts = by_product.get(f.product_id, {})
        logged = sum(n for n, _ in counts.values())
        recent = sum(r for _, r in counts.values())
        out.append(SaleStats(
            product=f.product_id, sale=f.sale_id, stock=f.stock,
            accepted=f.entries_read + f.lag,  # every order ever added, trimmed or not
            logged=logged,
            # an entry is acknowledged only after its event was confirmed
            published=max(0, f.entries_read - f.pending - f.dead_letters),
            running=counts.get("RUNNING", (0, 0))[0], failed=counts.get("FAILED", (0, 0))[0],
            lag=f.lag, pending=f.pending, dead_letters=f.dead_letters,
            orders_per_s=recent / 10))
    return out


COLUMNS = [("product", 10), ("sale", 18), ("stock", 7), ("accepted", 9), ("logged", 8),
           ("published", 10), ("running", 8), ("failed", 7), ("lag", 7), ("pending", 8),
           ("dead_letters", 13), ("orders_per_s", 13)]


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
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.connect_timeout)
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
