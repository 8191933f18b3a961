"""What the status consumer's test modules share: orders logged as the engine logs them,
reports published as the Resource Domain publishes them, and the rows they change."""

from __future__ import annotations

import time

from engine.amqp.topology import EXCHANGE, RK_STATUS
from engine.gate.redis_gate import Gate
from engine.pipeline.orderrows import write_batch
from engine.pipeline.orders import Order


async def publish(channel, body: bytes) -> None:
    await channel.basic_publish(body, exchange=EXCHANGE, routing_key=RK_STATUS)


async def log_orders(pool, gate: Gate, pid: int, users: list[int]) -> list[Order]:
    """Orders bought through the real gate and logged as the engine logs them."""
    orders = []
    for i, uid in enumerate(users):
        r = await gate.buy(pid, uid)
        assert r.outcome == "accepted"
        sale = (await gate.sale_state(pid)).sale_id
        orders.append(Order(pid, uid, r.stream_id, int(time.time()), sale, r.slot, b"s",
                            pid * 1000 + i))
    await write_batch(pool, orders, 10)
    return orders


def owners(orders: list[Order]) -> dict[int, dict[str, int]]:
    """Per instance, the user and product its reports must name."""
    return {o.instance_id: {"user_id": o.user_id, "product_id": o.product_id} for o in orders}


async def rows(pool, pid):
    return {r["instance_id"]: r for r in await pool.fetch(
        "SELECT * FROM seckill_logs WHERE product_id = $1", pid)}
