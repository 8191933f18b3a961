"""The reader on a Redis Cluster with many sales: idle, woken, backlogged.

A cluster reader cannot name two slots in one XREADGROUP, so it must not pay one command
per sale on every read: an idle reader sends a few commands per `block_ms` (counted on
the masters with INFO commandstats, not timed), an order on a sale idle for a while is
still read at the next probe, and a backlog over many sales is read in batches of about
`batch_size` with many entries per stream, every entry once.
"""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.crc import key_slot

from engine.keys import Keys
from engine.pipeline.clusterreader import DEEP_PER_STREAM, ClusterReader
from engine.pipeline.reader import ensure_group
from engine.testing.clusters import LocalRedisCluster
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)
SALES = 200
BLOCK_MS = 100


def masters(cluster: LocalRedisCluster) -> list[SyncRedis]:
    return [SyncRedis(port=node.port, socket_timeout=10) for node in cluster.serving()]


def reads_and_probes(cluster: LocalRedisCluster) -> int:
    """XREADGROUP and EVAL calls on every master since the last CONFIG RESETSTAT."""
    total = 0
    for client in masters(cluster):
        stats = client.info("commandstats")
        total += sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                     for c in ("xreadgroup", "eval"))
        client.close()
    return total


def reset_stats(cluster: LocalRedisCluster) -> None:
    for client in masters(cluster):
        client.config_resetstat()
        client.close()


async def sales(redis: Redis, count: int) -> tuple[Keys, list[int]]:
    keys = Keys(f"test:{uuid.uuid4().hex[:8]}:")
    pids = list(range(1, count + 1))
    for pid in pids:
        await ensure_group(redis, keys.stream(pid))
    await redis.sadd(keys.streams, *pids)
    return keys, pids


async def idle_reader(redis: Redis, keys: Keys, batch_size: int = 1000) -> ClusterReader:
    """A reader past its start: streams discovered, its own (empty) pending lists read."""
    reader = ClusterReader(redis, keys, "c1", batch_size, BLOCK_MS, max_deliveries=5)
    assert await reader.discover() == SALES
    await reader.read()  # cursor 0 on every stream: nothing pending, every stream goes to ">"
    return reader


async def test_an_idle_reader_sends_a_few_commands_per_block(cluster_redis, redis_cluster):
    keys, _ = await sales(cluster_redis, SALES)
    assert len({key_slot(keys.stream(p).encode()) for p in range(1, SALES + 1)}) > 150
    reader = await idle_reader(cluster_redis, keys)
    reset_stats(redis_cluster)
    reads, start = 0, time.monotonic()
    while time.monotonic() - start < 1.0:  # the scenario: one second of idle reads
        entries, dead = await reader.read()
        assert entries == [] and dead == []
        reads += 1
    commands = reads_and_probes(redis_cluster)
    blocks = (time.monotonic() - start) * 1000 / BLOCK_MS
    # each wait: one probe per master and one blocking XREADGROUP; one XREADGROUP per
    # sale (the reader before the probe) would be 200 per wait
    assert reads <= blocks + 2, f"{reads} reads: the reader does not block"
    assert commands <= (blocks + 2) * (len(redis_cluster.serving()) + 1), \
        f"{commands} commands in {reads} idle reads over {SALES} sales"


async def test_an_order_on_a_sale_idle_for_a_while_is_read(cluster_redis):
    keys, pids = await sales(cluster_redis, SALES)
    reader = await idle_reader(cluster_redis, keys)
    for _ in range(3):  # several probes and waits: nothing is busy any more
        assert await reader.read() == ([], [])
    pid = pids[SALES // 2]
    entry_id = await cluster_redis.xadd(keys.stream(pid), {"uid": "7", "slot": "1"})
    got: list = []
    reads = 0
    while not got and reads < 3:
        got, _ = await reader.read()
        reads += 1
    # read by the wait it lands in (its own slot was the last busy one) or the next probe
    assert [e.stream_id for e in got] == [entry_id.decode()]
    assert reads <= 2, f"read only after {reads} reads"


async def test_a_backlog_over_many_sales_is_read_in_shares(cluster_redis):
    keys, pids = await sales(cluster_redis, SALES)
    reader = await idle_reader(cluster_redis, keys, batch_size=1000)
    per_sale = 60
    for pid in pids:
        pipe = cluster_redis.pipeline(transaction=False)
        for n in range(per_sale):
            pipe.xadd(keys.stream(pid), {"uid": str(n), "slot": str(n + 1)})
        await pipe.execute()
    seen: list[str] = []
    batches: list[tuple[int, int]] = []  # (entries, streams) per read

    async def all_read() -> bool:
        entries, _ = await reader.read()
        if entries:
            batches.append((len(entries), len({e.stream for e in entries})))
            seen.extend(f"{e.stream.decode()}/{e.stream_id}" for e in entries)
        return len(seen) >= SALES * per_sale

    await wait_for(all_read, 60, "the backlog read", interval=0)
    assert len(seen) == SALES * per_sale == len(set(seen)), "every entry read, and once"
    # past the first probe's read, a backlogged stream gives DEEP_PER_STREAM entries a read,
    # and a read stays near batch_size however many sales are busy
    deep = batches[1:-2]
    assert deep and all(n <= 2 * 1000 for n, _ in deep), batches
    assert sum(n for n, _ in deep) / sum(s for _, s in deep) >= DEEP_PER_STREAM * 0.9, batches
