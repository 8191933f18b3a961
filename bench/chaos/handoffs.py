"""The path after sell-out (issue 23) in a chaos sale, and what its faults must not cost.

A returned unit (a failed order's, a released instance's) goes to the waitlist's head
or back to stock, exactly once. The faults that strike that path (faults.after_sell_out)
run a sale with a waitlist (`join_waitlist`), failures and releases
(`request_releases`); the helpers they share are here too.

`read()` reads the sale's ledger once everything is final and names what went wrong
with the waitlist's invariant checker (engine.testing.invariants.ledger_problems): a
unit lost or handed twice (stock plus units held is not the stock), a returned order
never handed on, a user with two live orders, units leaving the line out of turn.
`accounted()` turns the handed orders into purchases for the invariant
checker (each returned unit may be sold once more).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from engine.gate.redis_gate import Gate
from engine.gate.releases import LATEST_ORDER, request_release
from engine.keys import GROUP
from engine.testing.invariants import GIVEN_BACK_STATES, Accepted, ledger_problems, read_ledger

# `sale`: a runner.Sale (not imported: the runner imports this module)
Sale = Any

RELEASES = 50  # owners who give their instance back during a release fault


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the sale's waiting users and releases ---------------------------------------------
async def join_waitlist(sale: Sale, users: list[int]) -> None:
    """The users wait in this order from the sale's start, as the gate's waitlist keeps
    them (a sorted set scored by turn, the last turn handed out in waitlist-seq): the
    join script itself answers "buy instead" while stock is left."""
    pid = sale.product_id
    await sale.redis.zadd(sale.keys.waitlist(pid),
                          {str(u): turn for turn, u in enumerate(users, 1)})
    await sale.redis.set(sale.keys.waitlist_seq(pid), len(users))
    sale.waiting = list(users)


async def request_releases(sale: Sale, count: int) -> int:
    """`count` owners of RUNNING orders give them back, as `DELETE .../order` does
    (engine.gate.releases.request_release); how many were asked."""
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        users = [r[0] for r in await conn.fetch(
            "SELECT user_id FROM seckill_logs WHERE product_id = $1 AND status = 'RUNNING'"
            " ORDER BY id LIMIT $2", sale.product_id, count)]

        async def latest(pid: int, uid: int) -> Any:
            return await conn.fetchrow(LATEST_ORDER, pid, uid)

        gate = Gate(sale.redis, sale.keys)
        asked = [await request_release(gate, latest, sale.product_id, u) for u in users]
    finally:
        await conn.close()
    sale.released += sum(a.new for a in asked)
    return sum(a.new for a in asked)


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
    """What the sale's returned units became, and the waitlist's invariants that do not
    hold (engine.testing.invariants.ledger_problems: stock + units held = the stock,
    each returned unit made one order or one unit of stock, one live order per user,
    units left the waitlist in join order)."""

    returned: int = 0  # FAILED and RELEASED orders of the sale
    handed: list[int] = field(default_factory=list)  # waiting users given an order
    handed_orders: list[Accepted] = field(default_factory=list)
    stock_left: int = 0
    problems: list[str] = field(default_factory=list)


async def read(sale: Sale) -> Handoffs:
    conn = await asyncpg.connect(sale.settings.pg_dsn, timeout=10)
    try:
        ledger = await read_ledger(sale.redis, sale.keys, sale.product_id, sale.sale_id,
                                   sale.fault.stock, conn=conn)
    finally:
        await conn.close()
    statuses = ledger.statuses or {}
    handed = [e for e in ledger.entries if e.turn is not None]
    return Handoffs(
        returned=sum(s in GIVEN_BACK_STATES for s in statuses.values()),
        handed=[e.user_id for e in handed],
        handed_orders=[Accepted(sale.product_id, e.stream_id, sale.sale_id, None)
                       for e in handed],
        stock_left=ledger.left, problems=ledger_problems(ledger))


def accounted(accepted: list[Accepted], found: Handoffs,
              stock: int) -> tuple[list[Accepted], int]:
    """(the purchases with the handed orders, the units the sale could sell): each
    returned unit may be sold once more, to a waiting user or to a buyer, in its own
    slot again. So no purchase is given its slot here: `check` would count a slot sold
    again as sold twice; a unit held twice is the ledger's to find (its slot chains and
    its count of units), and the database's slot index refuses it anyway."""
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
