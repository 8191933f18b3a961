"""gate_wait_replicas: a 202 only for a purchase a replica acknowledged (WAIT on the
connection of the master that took it); else a 503 'unreplicated', the order recorded.

Against the session's local Redis Cluster (a replica per master) and, for the single
Redis path, the shared Redis (no replica: every accepted purchase is unreplicated)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from engine.errors import ConfigError, ServiceUnavailable
from engine.gate.redis_gate import Gate, check_replication
from engine.gate.routed import WaitFor
from engine.keys import Keys
from engine.testing.bff import Bff

pytestmark = pytest.mark.timeout(120)
WAIT_MS = 300


async def test_bff_answers_202_with_a_replica_and_503_while_it_cannot_ack(
        redis_cluster, cluster_settings, cluster_redis, keys, product_id):
    settings = cluster_settings.replace(gate_wait_replicas=1, gate_wait_ms=WAIT_MS,
                                        bff_auth="none")
    gate = Gate(cluster_redis, keys)
    await gate.open_sale(product_id, 10)
    master = redis_cluster.master_of_slot(cluster_redis.keyslot(keys.stream(product_id)))
    [replica] = redis_cluster.replicas_of(master)
    server = Bff(settings)
    buy = f"/api/v1/seckill/{product_id}"
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            r = await client.post(buy, json={"user_id": 1})
            assert r.status_code == 202, r.text
            replica.freeze()  # connected, but acknowledges nothing
            try:
                started = time.monotonic()
                r = await client.post(buy, json={"user_id": 2})
                waited = time.monotonic() - started
                # a rejected attempt is not held by WAIT: it wrote no order
                sold = await client.post(buy, json={"user_id": 1})
            finally:
                replica.thaw()
            body = r.json()
            assert r.status_code == 503 and body["status"] == "unreplicated", r.text
            assert "recorded" in body["message"] and f"/{product_id}/order" in body["message"]
            assert body["stream_id"] and body["slot"] == 9  # (slots count down from the stock)
            assert waited >= WAIT_MS / 1000 * 0.9  # WAIT gave the replica its time
            assert sold.status_code == 409
            # the order was recorded: the buyer is a buyer, a new attempt a duplicate
            r = await client.post(buy, json={"user_id": 2})
            assert (r.status_code, r.json()) == (409, {"status": "duplicate"})
            r = await client.post(buy, json={"user_id": 3})  # the replica is back
            assert r.status_code == 202, r.text
            metrics = httpx.get(server.admin_url + "/metrics", timeout=5).text
            assert "seckill_bff_unreplicated_total 1.0" in metrics
    finally:
        server.stop()
    assert (await gate.sale_state(product_id)).buyers == 3


async def test_one_batch_waits_per_master_and_only_for_accepted_orders(
        redis_cluster, cluster_redis, keys, product_ids):
    """The attempts of one loop turn span masters: only the purchases on the master whose
    replica is frozen are unreplicated; the rest are accepted, sold-out ones answered.

    A first round with every replica up leaves written-to connections in the pool: a
    WAIT sent down one of them instead of the purchases' own would count an old write,
    already acknowledged, and answer "accepted"."""
    gate = Gate(cluster_redis, keys, coalesce=True, wait=WaitFor(1, WAIT_MS))
    masters = {}
    for pid in product_ids:
        master = redis_cluster.master_of_slot(cluster_redis.keyslot(keys.stream(pid)))
        masters.setdefault(master.port, (master, []))[1].append(pid)
        await gate.open_sale(pid, 2)
    assert len(masters) >= 2, "the products landed on one master; pick others"
    (frozen_master, frozen_pids), *_ = masters.values()
    [replica] = redis_cluster.replicas_of(frozen_master)
    pids = [pid for _, group in masters.values() for pid in group]
    warm = await asyncio.gather(*(gate.buy(pid, 1) for pid in pids))
    assert [r.outcome for r in warm] == ["accepted"] * len(pids)
    replica.freeze()
    try:
        first = await asyncio.gather(*(gate.buy(pid, 2) for pid in pids))
        second = await asyncio.gather(*(gate.buy(pid, 3) for pid in pids))
    finally:
        replica.thaw()
    assert {pid: r.outcome for pid, r in zip(pids, first, strict=True)} == {
        pid: "unreplicated" if pid in frozen_pids else "accepted" for pid in pids}
    assert all(r.stream_id for r in first)
    assert [r.outcome for r in second] == ["sold_out"] * len(pids)


async def test_the_bff_start_check_counts_attached_replicas(cluster_redis):
    await check_replication(cluster_redis, 1, setting="gate_wait_replicas",
                            required_per_write=False)
    with pytest.raises(ConfigError, match="gate_wait_replicas = 2: .* 1 replica"):
        await check_replication(cluster_redis, 2, setting="gate_wait_replicas",
                                required_per_write=False)


async def test_single_redis_without_replicas_answers_unreplicated(settings, product_id):
    """The single-server path (one pooled connection per batch): the shared Redis has no
    replica, so WAIT 1 times out and the order is recorded but unreplicated."""
    redis = Redis.from_url(settings.redis_url)
    try:
        if int((await redis.info("replication"))["connected_slaves"]):
            pytest.skip("this Redis has replicas")
        gate = Gate(redis, Keys(settings.key_prefix), wait=WaitFor(1, 20))
        await gate.open_sale(product_id, 1)
        results = await asyncio.gather(gate.buy(product_id, 1), gate.buy(product_id, 2))
        assert [r.outcome for r in results] == ["unreplicated", "sold_out"]
        assert (await gate.sale_state(product_id)).buyers == 1
        assert (await gate.buy(product_id, 1)).outcome == "duplicate"
    finally:
        await redis.aclose()


async def test_purchases_follow_a_slot_moving_to_another_master(
        redis_cluster, cluster_redis, keys, product_id):
    """Mid-migration the old master answers ASK (the keys are gone from it) and the new
    one, after ASKING, TRYAGAIN (the attempt's rate-limiter keys exist nowhere yet): the
    attempt is sent again a few times, then fails as a 503 would, in well under a second.
    Once the slot has moved the old master answers MOVED: the attempt goes to the new
    master and WAIT follows it there (its replica acknowledges: accepted)."""
    gate = Gate(cluster_redis, keys, coalesce=True, wait=WaitFor(1, 2000))
    await gate.open_sale(product_id, 10)
    assert (await gate.buy(product_id, 1)).outcome == "accepted"  # the slot map cached
    slot = cluster_redis.keyslot(keys.stream(product_id))
    source = redis_cluster.master_of_slot(slot)
    target = next(n for n in redis_cluster.serving() if n is not source)
    src, dst = (SyncRedis(port=n.port, socket_timeout=5) for n in (source, target))
    try:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", redis_cluster.node_id(source))
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", redis_cluster.node_id(target))
        while moving := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                "KEYS", *moving)
        with pytest.raises(ServiceUnavailable, match="TRYAGAIN|ASK|[0-9]+ 127"):
            await gate.buy(product_id, 2)
        for node in redis_cluster.serving():
            SyncRedis(port=node.port, socket_timeout=5).execute_command(
                "CLUSTER SETSLOT", slot, "NODE", redis_cluster.node_id(target))
        moved = await gate.buy(product_id, 2)  # MOVED: the cached map still names the source
    finally:
        src.close()
        dst.close()
    assert moved.outcome == "accepted"
    assert redis_cluster.master_of_slot(slot) is target
    assert (await gate.buy(product_id, 2)).outcome == "duplicate"
    assert (await gate.sale_state(product_id)).buyers == 2
