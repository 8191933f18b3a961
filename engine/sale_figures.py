"""Per-sale figures read straight from Redis: stock, stream length, lag, pending, dead letters.

Used by the supervisor's /metrics (read at scrape time, so exported once and
not once per worker) and by `seckill stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.exceptions import ResponseError

from engine.keys import GROUP, Keys


@dataclass(frozen=True, slots=True)
class SaleFigures:
    product_id: int
    sale_id: str | None
    stock: int | None
    buyers: int
    length: int
    lag: int
    pending: int
    dead_letters: int
    consumers: int
    entries_read: int


def read_figures(redis: Redis, keys: Keys) -> list[SaleFigures]:
    """One pipelined round trip for all known sales, then one for their groups."""
    pids = sorted(int(p) for p in redis.smembers(keys.streams))
    if not pids:
        return []
    pipe = redis.pipeline(transaction=False)
    for pid in pids:
        pipe.get(keys.sale(pid))
        pipe.get(keys.stock(pid))
        pipe.scard(keys.buyers(pid))
        pipe.xlen(keys.stream(pid))
        pipe.xlen(keys.dlq(pid))
    basics = pipe.execute()
    groups = pipe_groups(redis, [keys.stream(pid) for pid in pids])
    out = []
    for i, pid in enumerate(pids):
        sale, stock, buyers, length, dead = basics[5 * i:5 * i + 5]
        group = groups[i]
        out.append(SaleFigures(
            product_id=pid, sale_id=sale.decode() if sale else None,
            stock=int(stock) if stock is not None else None, buyers=buyers, length=length,
            lag=_lag(group, length), pending=int(group.get("pending", 0)),
            dead_letters=dead, consumers=int(group.get("consumers", 0)),
            entries_read=int(group.get("entries-read") or 0)))
    return out


def pipe_groups(redis: Redis, streams: list[str]) -> list[dict]:
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    replies = pipe.execute(raise_on_error=False)
    out = []
    for reply in replies:
        group: dict = {}
        if not isinstance(reply, (ResponseError, Exception)):
            for g in reply:
                name = g.get("name")
                if name in (GROUP, GROUP.encode()):
                    group = {(k.decode() if isinstance(k, bytes) else k): v
                             for k, v in g.items()}
        out.append(group)
    return out


def _lag(group: dict, length: int) -> int:
    """Entries not yet delivered to the group (Redis 7 reports it; older: estimate)."""
    lag = group.get("lag")
    if lag is not None:
        return int(lag)
    read = group.get("entries-read")
    return max(0, length - int(read)) if read is not None else length
