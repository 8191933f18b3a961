"""An owner gives back what they hold: leave the waitlist, or release a RUNNING instance.

One function for both doors, `DELETE /api/v1/seckill/{product_id}/order` (the BFF)
and `seckill order release` (operators), so they answer alike. A release is only
asked for here: the request goes to the product's release stream once per order
(lua/release.lua), and the engine moves the order RUNNING -> RELEASING -> RELEASED
while the Resource Domain deletes the instance; its unit then goes to the waitlist's
head (lua/refund.lua). The order's state comes from PostgreSQL, as GET .../order
reads it; PostgreSQL is only read here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from engine.errors import UsageError
from engine.gate.redis_gate import Gate, validate_id
from engine.orderstates import FINAL, PROCESSING, RELEASED, RELEASING, RUNNING

LEFT = "LEFT"  # not a row's state: the user left the waitlist
PENDING = "PENDING"  # in the stream, not logged yet
# the caller's latest order, with the IDs a release request names
LATEST_ORDER = """
SELECT status, instance_id, stream_id, sale_id, compensated_at FROM seckill_logs
WHERE product_id = $1 AND user_id = $2 ORDER BY id DESC LIMIT 1
"""

OrderRow = Mapping[str, Any]
FetchOrder = Callable[[int, int], Awaitable[OrderRow | None]]
"""(product ID, user ID) -> the user's latest order row (LATEST_ORDER), or None."""


class NoOrder(UsageError):
    """The user neither waits nor holds an order of this product (HTTP 404)."""


class NotReleasable(UsageError):
    """The order cannot be released in its state (HTTP 409): not running yet, or failed."""


class Release(NamedTuple):
    """What a DELETE did: `state` is LEFT, RELEASING or RELEASED; `new` is True when
    this call recorded the release request (HTTP 202), False when it was recorded
    before or the user only left the waitlist (200)."""

    state: str
    new: bool = False


async def request_release(gate: Gate, fetch_order: FetchOrder, product_id: int,
                          user_id: int) -> Release:
    """Leave the waitlist, or ask once for the release of a RUNNING order; NoOrder or
    NotReleasable when there is nothing to give back."""
    pid = validate_id("product_id", product_id)
    uid = validate_id("user_id", user_id)
    if await gate.leave_waitlist(pid, uid):
        return Release(LEFT)
    row = await fetch_order(pid, uid)
    buyer = bool(await gate.redis.sismember(gate.keys.buyers(pid), str(uid)))
    # an order's unit went back (failed, released) and the user got a new one: pending
    if row is None or (row["status"] in FINAL and row["compensated_at"] and buyer):
        if buyer:
            raise NotReleasable(f"order {PENDING}: release it after it runs")
        raise NoOrder(f"user {uid} has no order for product {pid} and is not waiting")
    status = row["status"]
    if status == RUNNING:
        new = await gate.record_release(pid, uid, int(row["instance_id"]), row["stream_id"],
                                        row["sale_id"])
        return Release(RELEASING, new)
    if status in (RELEASING, RELEASED):
        return Release(status)
    if status == PROCESSING:
        raise NotReleasable(f"order {PROCESSING}: release it after it runs")
    raise NotReleasable(f"order {status}: nothing to release")
