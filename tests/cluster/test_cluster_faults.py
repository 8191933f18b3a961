"""The engine on a Redis Cluster that changes under it: a busy product's slot resharded
to another master while orders flow, and the master of another one killed (its replica
promoted), the gate's durability setting (gate_wait_replicas) on. Nothing accepted is
lost, nothing is processed twice, no worker crashes."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
import uvloop
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from support import log_rows, open_sales, pending_count, push_orders, rows_at_least

from engine import backoff, exits
from engine.connections import connect_redis
from engine.errors import ServiceUnavailable
from engine.gate.redis_gate import Gate, GateResult
from engine.gate.routed import WaitFor
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(600)

SALES = 10
PER_PUSH = 300
BUYERS = 50  # per product, through the gate with WAIT


def test_a_write_to_a_reset_cluster_connection_is_a_connection_error(cluster_settings):
    """A master killed under a connection the pool still holds: the next command written
    to it must fail as a ConnectionError (the cluster client then reloads its slot map
    and every retry set takes it), not as uvloop's RuntimeError ("the handler is
    closed"), of which a worker's discovery loop died during the failover below; nor
    as an AttributeError (no writer left), of which its janitor died. Under uvloop, as
    the workers run (plain asyncio fails the first in drain(), as it should)."""

    async def write_after_reset() -> None:
        redis = await connect_redis(cluster_settings)
        node = redis.get_default_node()  # type: ignore[attr-defined]
        try:
            await redis.ping(target_nodes=node)  # a connected connection back in the pool
            conn = node.acquire_connection()
            try:
                assert conn.is_connected
                conn._writer.transport.abort()  # reset, and no read has noticed yet
                with pytest.raises(RedisConnectionError):
                    await conn.send_command("PING")
                # closed under a command by another task (the cluster client reloading its
                # slot map), between its connect and its handshake's first write
                await conn.connect()
                await conn.disconnect()
                with pytest.raises(ConnectionResetError):
                    await conn._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
            finally:
                node.release(conn)
        finally:
            await redis.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(write_after_reset())


async def test_reshard_and_failover_while_orders_flow(redis_cluster, cluster_settings,
                                                      cluster_redis, keys):
    """With gate_wait_replicas on: the replica of the master about to die is frozen while
    buyers come, so that master's purchases are answered "unreplicated" (503), the other
    masters' "accepted"; the master is killed and the stale replica promoted. Every order
    accepted (and every entry written before, on a replica by WAIT) is processed once;
    an unreplicated one may be lost or not; no worker crashes."""
    settings, redis = cluster_settings, cluster_redis
    first = random.randrange(10**9, 9 * 10**9)
    pids = list(range(first, first + SALES))
    await open_sales(settings, redis, keys, pids)
    resharded, failed = (key_slot(keys.stream(pid).encode()) for pid in pids[:2])
    killed = frozen = None
    must: set[tuple[int, str]] = set()  # (product, stream ID) of every order promised
    unreplicated: set[tuple[int, str]] = set()
    async with EventTap(settings.amqp_url) as tap:
        engine = EngineProcess(settings, workers=2, batch_size=100, claim_idle_ms=5000,
                               janitor_interval=0.5)
        try:
            for pid in pids:
                must.update((pid, i) for i in await push_orders(redis, keys, pid,
                                                                range(1, PER_PUSH + 1)))
            await wait_for(lambda: rows_at_least(settings, pids, 300), 120, "work under way")
            # the busy first product's slot moves to another master, keys and all
            target = next(n for n in redis_cluster.serving()
                          if n is not redis_cluster.master_of_slot(resharded))
            moved = await asyncio.to_thread(redis_cluster.move_slot, resharded, target)
            assert moved >= 1 and redis_cluster.master_of_slot(resharded) is target
            for pid in pids:  # more orders, some for the slot that just moved
                must.update((pid, i) for i in await push_orders(
                    redis, keys, pid, range(PER_PUSH + 1, 2 * PER_PUSH + 1),
                    first_slot=PER_PUSH + 1))
            # the entries written around the gate are on a replica too (WAIT by hand)
            for node in redis_cluster.serving():
                await redis.execute_command("WAIT", 1, 5000, target_nodes=redis.get_node(
                    node_name=f"127.0.0.1:{node.port}"))
            # buyers through the gate with WAIT, the doomed master's replica frozen
            doomed = redis_cluster.master_of_slot(failed)
            [frozen] = redis_cluster.replicas_of(doomed)
            on_doomed = {pid: redis_cluster.master_of_slot(key_slot(keys.stream(pid).encode()))
                         is doomed for pid in pids}
            gate = Gate(redis, keys, coalesce=True, wait=WaitFor(1, 500))
            for pid in pids:
                await gate.open_sale(pid, BUYERS + 1)
            frozen.freeze()
            results = await asyncio.gather(*(gate.buy(pid, uid) for pid in pids
                                             for uid in range(10**6, 10**6 + BUYERS)))
            for result, pid in zip(results, (p for p in pids for _ in range(BUYERS)),
                                   strict=True):
                assert result.outcome == ("unreplicated" if on_doomed[pid] else "accepted")
                (unreplicated if on_doomed[pid] else must).add((pid, result.stream_id))
            assert unreplicated, "no product on the doomed master"
            # the master dies; its replica, thawed, is promoted without those orders
            killed = doomed
            await asyncio.to_thread(doomed.kill)
            frozen.thaw()
            await asyncio.to_thread(redis_cluster.wait_promoted, failed, doomed)
            # the gate finds the promoted master (an attempt may fail on the dead one
            # first); with no replica of its own yet, its purchases are unreplicated
            pid = next(p for p in pids if on_doomed[p])
            result = await buy_after_failover(gate, pid, 2 * 10**6)
            assert result.outcome == "unreplicated"
            unreplicated.add((pid, result.stream_id))
            for pid in pids:
                must.update((pid, i) for i in await push_orders(
                    redis, keys, pid, range(2 * PER_PUSH + 1, 3 * PER_PUSH + 1),
                    first_slot=2 * PER_PUSH + 1))
            await wait_for(lambda: processed(settings, redis, keys, pids, must), 300,
                           "every order after the reshard and the failover")
            rows = await log_rows(settings, pids)
            events = await collect_orders(tap, len(rows), timeout=120)
        finally:
            engine.stop()
            if frozen is not None:
                frozen.thaw()
            if killed is not None:  # back as a replica of the promoted node
                await asyncio.to_thread(killed.start)
                await asyncio.to_thread(redis_cluster.start)
    logged = {(r["product_id"], r["stream_id"]) for r in rows}
    assert must <= logged and logged <= must | unreplicated
    assert_one_id_per_order(rows, [e for e in events if e.product_id in pids], len(rows))
    # A worker may lose its node lease while the slot of the leases fails over (it exits
    # with LEASE_LOST and is respawned on another node ID); none crashes, none loops.
    out = engine.output()
    exits_seen = [int(code) for code in re.findall(r"worker \d+ exited with (\d+)", out)]
    crashes = [code for code in exits_seen if code not in (exits.OK, exits.LEASE_LOST)]
    errors = "\n".join(line for line in out.splitlines() if " ERROR " in line)
    assert not crashes, errors[-4000:] or out[-4000:]
    assert exits_seen.count(exits.LEASE_LOST) <= 2, out[-4000:]
    assert "batch crashed" not in out, errors[-4000:]


async def buy_after_failover(gate: Gate, pid: int, uid: int) -> GateResult:
    """A buyer's retries, with backoff, while the cluster fails over (what a client does;
    the last attempt's answer or error is the test's)."""
    for attempt in range(1, 6):
        try:
            return await gate.buy(pid, uid)
        except ServiceUnavailable:
            await asyncio.sleep(backoff.delay(attempt, 1.0))
    return await gate.buy(pid, uid)


async def processed(settings, redis, keys, pids, must: set[tuple[int, str]]) -> bool:
    """Every promised order logged and nothing pending (the unreplicated ones may or may
    not be among the rows)."""
    if await pending_count(redis, keys, pids):
        return False
    return must <= {(r["product_id"], r["stream_id"]) for r in await log_rows(settings, pids)}
