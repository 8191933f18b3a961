"""The waitlist's scripts on a Redis Cluster: every key of a product shares its hash tag,
so joining, the position, the handoff, a release request and a close each run on the
master of that product's slot, whichever it is."""

from __future__ import annotations

from redis.crc import key_slot
from support import on_several_masters

from engine.gate.redis_gate import Gate, Position
from engine.gate.releases import request_release


async def test_the_waitlist_on_a_cluster(cluster_redis, keys, product_ids):
    pids = on_several_masters(cluster_redis, keys, product_ids[:4])
    nodes = {cluster_redis.get_node_from_key(keys.stream(pid)).name for pid in pids}
    assert len(nodes) > 1, "the products should live on several masters"
    for coalesce in (False, True):
        gate = Gate(cluster_redis, keys, coalesce=coalesce)
        for pid in pids:
            new = [keys.waitlist(pid), keys.waitlist_seq(pid), keys.waitlist_stats(pid),
                   keys.waitlist_ended(pid), keys.releases(pid), keys.release_requested(pid)]
            assert {key_slot(k.encode()) for k in new} == {key_slot(keys.stock(pid).encode())}
            sale = await gate.open_sale(pid, 1, clear_buyers=True)
            bought = await gate.buy(pid, 1)
            assert (await gate.join_waitlist(pid, 2, ip="10.0.0.9"))[:2] == ("joined", 1)
            assert await gate.position(pid, 2) == Position("waiting", 1, 0)
            handed = await gate.return_unit(pid, 1, sale, bought.slot, bought.stream_id)
            assert (handed.outcome, handed.user_id) == ("handed", 2)
            row = {"status": "RUNNING", "instance_id": 7, "stream_id": handed.stream_id,
                   "sale_id": sale, "compensated_at": None}
            assert (await request_release(gate, found(row), pid, 2)).new is True
            await gate.join_waitlist(pid, 3)
            await gate.close_sale(pid)
            assert await gate.position(pid, 3) == Position("ended")
            assert (await gate.waitlist_figures(pid)).handed == 1
        await gate.close()


def found(row: dict[str, object]):
    """An order lookup that finds `row` (its state as the engine left it)."""
    async def fetch(pid: int, uid: int) -> dict[str, object]:
        return row
    return fetch
