"""The engine and the Resource Domain on a 3-node RabbitMQ cluster (the session's own).

`amqp_url` lists every node; the node they are connected to is stopped mid-drain: they
move to another node, the quorum queues carry on there, nothing is lost and every order
keeps one instance ID.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import uuid
from typing import Any

import aiormq
import asyncpg
import pytest
from support import add_products, all_done, announce, log_rows, push_orders, rows_at_least

from engine.amqp.topology import EXCHANGE, QUEUE_CREATED, QUEUE_STATUS, RK_CREATED
from engine.connections import amqp_brokers
from engine.pb import event_pb2
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import SECKILL, EngineProcess, engine_env, stop_process
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(600)

ORDERS = 10_000


def test_several_brokers_in_one_url():
    assert amqp_brokers("amqp://u:p@h1:5672,h2:5673 ,h3/v%2Fx?heartbeat=5") == [
        "amqp://u:p@h1:5672/v%2Fx?heartbeat=5", "amqp://u:p@h2:5673/v%2Fx?heartbeat=5",
        "amqp://u:p@h3/v%2Fx?heartbeat=5"]
    assert amqp_brokers("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"]


async def quorum_tap(url: str) -> str:
    """A quorum queue bound to instance.created: it outlives the loss of any one node."""
    name = f"test-tap-{uuid.uuid4().hex[:8]}"
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.queue_bind(name, EXCHANGE, routing_key=RK_CREATED)
    finally:
        await conn.close()
    return name


async def drain(url: str, queue: str, timeout: float = 120) -> list[Any]:
    """Every event in `queue` until it stays empty (a repeated order's event included)."""
    events: list[Any] = []
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            message = await channel.basic_get(queue, no_ack=True)
            if message.delivery_tag is None:  # Basic.GetEmpty
                break
            event = event_pb2.Event()
            event.ParseFromString(message.body)
            events.append(event)
        await channel.queue_delete(queue)
    finally:
        await conn.close()
    return events


async def purge(url: str, *queues: str) -> None:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        for queue in queues:
            await channel.queue_purge(queue)
    finally:
        await conn.close()


async def running(settings, pid) -> int:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM seckill_logs WHERE product_id = $1"
                                   " AND status = 'RUNNING'", pid)
    finally:
        await conn.close()


async def test_the_node_in_use_stops_mid_drain(rabbit_cluster, rabbit_cluster_settings, redis,
                                               keys, product_id):
    settings, pid = rabbit_cluster_settings, product_id
    first, *others = rabbit_cluster.nodes
    survivor = others[-1].url
    await purge(survivor, QUEUE_CREATED, QUEUE_STATUS)
    tap = await quorum_tap(survivor)
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    await push_orders(redis, keys, pid, range(1, ORDERS + 1))
    rd_log = tempfile.NamedTemporaryFile(prefix="seckill-rd-", suffix=".log", delete=False)
    rd = subprocess.Popen([SECKILL, "resource-domain"], stdout=subprocess.DEVNULL, stderr=rd_log,
                          env=engine_env(settings, rd_metrics_port=0, rd_delay_ms=1,
                                         rd_output_dir=tempfile.mkdtemp()))
    engine = EngineProcess(settings, workers=2, batch_size=200)
    try:
        await wait_for(lambda: rows_at_least(settings, [pid], 2000), 120, "work under way")

        async def provisioning() -> bool:
            return await running(settings, pid) > 0

        await wait_for(provisioning, 120, "the Resource Domain at work")
        # everyone connected to the first node that answered: the first one listed
        await asyncio.to_thread(first.stop_app)
        await wait_for(lambda: all_done(settings, redis, keys, [pid], ORDERS), 240,
                       "every order logged and acknowledged after the node stopped")

        async def all_running() -> bool:
            return await running(settings, pid) == ORDERS

        await wait_for(all_running, 240, "every order provisioned and RUNNING")
    finally:
        engine.stop()
        stop_process(rd)
        rd_log.close()
    events = await drain(survivor, tap)
    rows = await log_rows(settings, [pid])
    assert_one_id_per_order(rows, [e for e in events if e.product_id == pid], ORDERS)
    out = engine.output()
    assert "exited with" not in out.replace("exited with 0", ""), out[-3000:]
