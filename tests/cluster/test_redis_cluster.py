"""The engine on a Redis Cluster (3 masters, one replica each, the session's own).

Every product's keys share `{pid}`, so the gate script runs on one slot; what spans
products (the reader, the acknowledgements, the node leases, the admin commands) must
split by slot. These tests fail with CROSSSLOT, "non local key" or MOVED otherwise.
"""

from __future__ import annotations

import asyncio
import random
import subprocess

import orjson
import pytest
from redis.crc import key_slot
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    on_several_masters,
    open_sales,
    push_orders,
)

from engine.connections import cluster_startup, is_cluster
from engine.errors import ConfigError, NoFreeNodeId
from engine.gate.redis_gate import Gate, check_replication
from engine.keys import GROUP
from engine.pipeline.ids import MAX_NODES, NodeLease
from engine.process.health import SaleCollector
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import SECKILL, EngineProcess, engine_env
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(600)
IP = "192.0.2.1"


def test_cluster_url_names_every_startup_node_and_the_credentials():
    nodes, options = cluster_startup("redis+cluster://u:p%40ss@10.0.0.1:7001,h2:7002,h3/0")
    assert nodes == [("10.0.0.1", 7001), ("h2", 7002), ("h3", 6379)]
    assert options == {"ssl": False, "username": "u", "password": "p@ss"}


async def test_gate_on_a_cluster_recovers_noscript_per_node(cluster_redis, keys, product_ids):
    assert is_cluster(cluster_redis)
    gate = Gate(cluster_redis, keys, coalesce=True)
    pids = product_ids[:4]
    for pid in pids:
        await gate.open_sale(pid, 3)
    assert len({key_slot(keys.stream(pid).encode()) for pid in pids}) > 1
    # every key of an attempt in the product's slot (the per-IP limiter's too, if any)
    first = await asyncio.gather(*(gate.buy(pid, 7) for pid in pids))
    assert [r.outcome for r in first] == ["accepted"] * len(pids)
    # one node forgets its scripts (a restarted or promoted master): only the calls
    # routed there get NOSCRIPT, and they are retried after a reload
    node = cluster_redis.get_node_from_key(keys.stock(pids[0]))
    await cluster_redis.execute_command("SCRIPT FLUSH", target_nodes=node)
    again = await asyncio.gather(*(gate.buy(pid, 8, ip=IP) for pid in pids),
                                 *(gate.buy(pid, 7, ip=IP) for pid in pids))
    assert [r.outcome for r in again] == ["accepted"] * len(pids) + ["duplicate"] * len(pids)
    state = await gate.sale_state(pids[0])
    assert (state.stock, state.buyers) == (1, 2)


async def test_node_leases_on_a_cluster_and_the_1025th_claimant(cluster_redis, keys):
    lease = NodeLease(cluster_redis, keys, owner="me", ttl_ms=60_000)
    node = await lease.acquire()
    assert await lease.renew()
    assert await cluster_redis.get(keys.node(node)) == b"me"
    # every other node ID taken by someone else: the next claimant gets the clear error
    pipe = cluster_redis.pipeline(transaction=False)
    for n in range(MAX_NODES):
        if n != node:
            pipe.set(keys.node(n), "other", px=60_000)
    await pipe.execute()
    with pytest.raises(NoFreeNodeId, match=f"all {MAX_NODES} snowflake node IDs"):
        await NodeLease(cluster_redis, keys, owner="late", ttl_ms=60_000).acquire()
    await lease.release()
    assert await cluster_redis.exists(keys.node(node)) == 0


async def test_20k_orders_across_100_sales_on_the_cluster(cluster_settings, cluster_redis, keys):
    settings, redis = cluster_settings, cluster_redis
    first = random.randrange(10**9, 9 * 10**9)
    pids = list(range(first, first + 100))
    await open_sales(settings, redis, keys, pids)
    slots = {key_slot(keys.stream(pid).encode()) for pid in pids}
    assert len(slots) > 90  # spread over (nearly) as many slots as sales, on every master
    per_sale = 200
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2)
        try:
            for pid in pids:
                await push_orders(redis, keys, pid, range(1, per_sale + 1))
            total = per_sale * len(pids)
            await wait_for(lambda: all_done(settings, redis, keys, pids, total), 300,
                           "20,000 orders logged and acknowledged")
            events = await tap.collect(total, timeout=120)
        finally:
            engine.stop()
    assert engine.wait(1) == 0, engine.output()[-3000:]
    rows = await log_rows(settings, pids)
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], total)
    for pid in pids:
        group = (await redis.xinfo_groups(keys.stream(pid)))[0]
        assert group["name"] == GROUP.encode() and group["pending"] == 0 and group["lag"] == 0
    out = engine.output()
    assert "CROSSSLOT" not in out and "non local key" not in out, out[-3000:]


async def test_gate_min_replicas_is_checked_on_every_master(cluster_redis, redis_cluster,
                                                            redis):
    await check_replication(cluster_redis, 0)  # not asked: nothing checked
    masters = cluster_redis.get_primaries()
    with pytest.raises(ConfigError, match="min-replicas-to-write 0"):
        await check_replication(cluster_redis, 1)  # replicas attached, not required
    try:
        for node in masters:
            await cluster_redis.execute_command("CONFIG SET", "min-replicas-to-write", "1",
                                                target_nodes=node)
        await check_replication(cluster_redis, 1)
        with pytest.raises(ConfigError, match="1 replica"):
            await check_replication(cluster_redis, 2)
    finally:
        for node in masters:
            await cluster_redis.execute_command("CONFIG SET", "min-replicas-to-write", "0",
                                                target_nodes=node)
    # the shared single Redis has no replica: refused, with what to do
    with pytest.raises(ConfigError, match="0 replica.*CONFIG SET min-replicas-to-write 1"):
        await check_replication(redis, 1)


def seckill(settings, *args: str) -> str:
    done = subprocess.run([SECKILL, *args], env=engine_env(settings), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_operator_commands_see_every_node(cluster_settings, cluster_redis, keys,
                                                product_ids):
    settings = cluster_settings
    pids = on_several_masters(cluster_redis, keys, product_ids[:6])
    await add_products(settings, pids)
    for pid in pids:
        await asyncio.to_thread(seckill, settings, "sale", "open", "--product", str(pid),
                                "--stock", "5")
        await push_orders(cluster_redis, keys, pid, range(1, 4))
    out = await asyncio.to_thread(seckill, settings, "buy", "--product", str(pids[0]),
                                  "--user", "99")
    assert "accepted" in out, out
    nodes = {cluster_redis.get_node_from_key(keys.stream(pid)).name for pid in pids}
    assert len(nodes) > 1, "the sales should live on several masters"
    stats = orjson.loads(await asyncio.to_thread(seckill, settings, "stats", "--json"))
    by_product = {s["product"]: s for s in stats}
    assert set(pids) <= set(by_product)
    assert [(by_product[pid]["lag"], by_product[pid]["stock"]) for pid in pids] == \
        [(4, 4)] + [(3, 5)] * (len(pids) - 1)
    await asyncio.to_thread(seckill, settings, "trim")
    for pid in pids:
        await asyncio.to_thread(seckill, settings, "dlq", "list", "--product", str(pid))
        # nothing acknowledged yet: trim kept every entry
        assert await cluster_redis.xlen(keys.stream(pid)) == (4 if pid == pids[0] else 3)


async def test_dead_letters_settle_per_product_on_the_cluster(cluster_settings, cluster_redis,
                                                              keys, product_ids):
    """Each product's dead letters and acknowledgements in one script call of its slot."""
    settings, redis, pids = cluster_settings, cluster_redis, product_ids[:4]
    await open_sales(settings, redis, keys, pids)
    for pid in pids:
        await push_orders(redis, keys, pid, range(1, 6))
        await redis.xadd(keys.stream(pid), {"uid": "not-a-number", "ts": "1"})
    engine = EngineProcess(settings, workers=1)

    async def settled() -> bool:
        lengths = [await redis.xlen(keys.dlq(pid)) for pid in pids]
        return lengths == [1] * len(pids) and await all_done(settings, redis, keys, pids, 20)

    try:
        await wait_for(settled, 120, "5 rows and 1 dead letter per product, nothing pending")
    finally:
        engine.stop()
    for pid in pids:
        (_, letter), = await redis.xrange(keys.dlq(pid))
        assert letter[b"reason"] and orjson.loads(letter[b"fields"])["uid"] == "not-a-number"


async def test_supervisor_gauges_read_every_node(cluster_settings, cluster_redis, keys,
                                                 product_ids):
    pids = product_ids[:6]
    for pid in pids:
        await announce(cluster_redis, keys, pid)
        await push_orders(cluster_redis, keys, pid, range(1, 3))
    collector = SaleCollector(cluster_settings.replace(engine_id="gauges-host"))
    lengths = {s.labels["product"]: s.value for family in collector.collect()
               if family.name == "seckill_stream_length" for s in family.samples}
    assert lengths == {str(pid): 2 for pid in pids}
