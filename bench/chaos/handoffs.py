"""The path after sell-out (issue 23) in a chaos sale, and what its faults must not cost.

A returned unit (a failed order's, a released instance's) goes to the waitlist's head
or back to stock, exactly once. The faults that strike that path (faults.after_sell_out)
run a sale with a waitlist (`join_waitlist`), failures and releases
(`request_releases`); the helpers they share are here too.

`read()` reads the ground truth once everything is final and names what went wrong:
a unit lost (stock plus live orders short of the sale's stock) or handed twice (more),
a returned order never handed on, a waiting user with two live orders, or users served
out of turn. `accounted()` turns the handed orders into purchases for the invariant
checker (each returned unit may be sold once more).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from engine.gate.redis_gate import Gate
from engine.keys import GROUP
from engine.testing.invariants import Accepted

# `sale`: a runner.Sale (not imported: the runner imports this module)
Sale = Any

LIVE = ("PROCESSING", "RUNNING", "RELEASING")
RELEASES = 50  # owners who give their instance back during a release fault


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the sale's waiting users and releases ---------------------------------------------
async def join_waitlist(sale: Sale, users: list[int]) -> None:
    """The users wait in this order (as the gate's waitlist keeps them: a sorted set
    scored by turn)."""
    key = sale.keys.waitlist(sale.product_id)
    await sale.redis.zadd(key, {str(u): turn for turn, u in enumerate(users, 1)})
    sale.waiting = list(users)


async def request_releases(sale: Sale, count: int) -> int:
    """`count` owners of RUNNING orders ask for a release, as `DELETE .../order` records
    it (the release stream's fields); how many were asked."""
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT user_id, instance_id, stream_id, sale_id FROM "
                                "seckill_logs WHERE product_id = $1 AND status = 'RUNNING'"
                                " ORDER BY id LIMIT $2", sale.product_id, count)
    finally:
        await conn.close()
    for r in rows:
        await sale.redis.xadd(sale.keys.releases(sale.product_id), {
            "uid": str(r["user_id"]), "instance_id": str(r["instance_id"]),
            "stream_id": r["stream_id"], "sale": r["sale_id"] or "",
            "at": str(int(time.time() * 1000))})
    sale.released += len(rows)
    return len(rows)


async def count_rows(sale: Sale, where: str) -> int:
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM seckill_logs WHERE product_id"
                                       f" = $1 AND {where}", sale.product_id))
    finally:
        await conn.close()


async def count_rd(sale: Sale, status: str) -> int:
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM resource_domain.instances i JOIN seckill_logs l USING "
            "(instance_id) WHERE l.product_id = $1 AND i.status = $2", sale.product_id,
            status))
    finally:
        await conn.close()


# -- the ground truth ------------------------------------------------------------------
@dataclass
class Handoffs:
    """What the sale's returned units became."""

    returned: int = 0  # FAILED and RELEASED orders of the sale
    handed: list[int] = field(default_factory=list)  # waiting users given an order
    handed_orders: list[Accepted] = field(default_factory=list)
    stock_left: int = 0
    live: int = 0
    problems: list[str] = field(default_factory=list)


async def read(sale: Sale) -> Handoffs:
    found = Handoffs()
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT user_id, stream_id, status, compensated_at FROM "
                                "seckill_logs WHERE product_id = $1 AND sale_id = $2",
                                sale.product_id, sale.sale_id)
    finally:
        await conn.close()
    for _, f in await sale.redis.xrange(sale.keys.stream(sale.product_id)):
        if f.get(b"from") == b"waitlist":
            found.handed.append(int(f[b"uid"]))
    entries = await sale.redis.xrange(sale.keys.stream(sale.product_id))
    found.handed_orders = [Accepted(sale.product_id, _text(i), sale.sale_id, None)
                           for i, f in entries if f.get(b"from") == b"waitlist"]
    returned = [r for r in rows if r["status"] in ("FAILED", "RELEASED")]
    found.returned = len(returned)
    found.stock_left = int(await sale.redis.get(sale.keys.stock(sale.product_id)) or 0)
    found.live = sum(r["status"] in LIVE for r in rows)
    found.problems = _problems(sale, found, rows, returned)
    return found


def _problems(sale: Sale, found: Handoffs, rows: list, returned: list) -> list[str]:
    out = []
    units = found.stock_left + found.live
    if units < sale.fault.stock:
        out.append(f"{sale.fault.stock - units} unit(s) lost: stock {found.stock_left} + "
                   f"live orders {found.live} < {sale.fault.stock}")
    if units > sale.fault.stock:
        out.append(f"{units - sale.fault.stock} unit(s) handed twice: stock "
                   f"{found.stock_left} + live orders {found.live} > {sale.fault.stock}")
    unhanded = [r["stream_id"] for r in returned if r["compensated_at"] is None]
    if unhanded:
        out.append(f"{len(unhanded)} returned order(s) never handed on, e.g. {unhanded[:3]}")
    owners = [r["user_id"] for r in rows if r["status"] in LIVE]
    doubled = sorted({u for u in owners if owners.count(u) > 1})
    if doubled:
        out.append(f"users with two live orders: {doubled[:5]}")
    turn = {u: i for i, u in enumerate(sale.waiting)}
    served = [turn[u] for u in found.handed if u in turn]
    if served != sorted(served) or len(served) != len(found.handed):
        out.append("waiting users served out of turn (or someone not waiting served)")
    return out


def accounted(accepted: list[Accepted], found: Handoffs,
              stock: int) -> tuple[list[Accepted], int]:
    """(the purchases with the handed orders, the units the sale could sell): each
    returned unit may be sold once more, to a waiting user or to a buyer, in its own
    slot again. So no purchase is given its slot here: `check` would count a slot sold
    again as sold twice; a unit held twice is this module's count (stock + live orders
    above the sale's stock), and the database's slot index refuses it anyway."""
    return ([dataclasses.replace(a, slot=None) for a in [*accepted, *found.handed_orders]],
            stock + found.returned)


async def release_stream_settled(sale: Sale) -> bool:
    """Every release request read and acknowledged."""
    stream = sale.keys.releases(sale.product_id)
    if not await sale.redis.exists(stream):
        return True
    for group in await sale.redis.xinfo_groups(stream):
        if _text(group["name"]) == GROUP:
            return not group["pending"] and group.get("lag") in (0, None)
    return False


def gate_hands_to_waitlist() -> bool:
    """Whether this gate's refund script hands a returned unit to the waitlist."""
    return hasattr(Gate, "join_waitlist")
