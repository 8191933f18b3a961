"""Redis unreachable in the middle of a run, on a Redis of the test's own.

The server is stopped (connections refused) while a batch waits for its rows to be
written, so the batch is logged and its events confirmed while its acknowledgement
cannot be sent. The reader backs off meanwhile and no worker exits. Then either
Redis comes back and the batch's ack goes through (one event per order), or the
engine dies first and the next one redelivers the entries: published again with the
instance IDs already logged.
"""

from __future__ import annotations

import collections
import re
import signal
from collections.abc import AsyncIterator, Iterator

import aiormq
import pytest
from redis.asyncio import Redis
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    pending_count,
    push_orders,
    row_count,
    table_locked,
)

from engine.testing.nodes import RedisNode
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

READ_RETRY = re.compile(r"read failed \(.*?\); retrying in ([0-9.]+)s")
BACKOFF_MAX = 1.0


@pytest.fixture
def node() -> Iterator[RedisNode]:
    """A Redis of this test's own, with an append-only file so a stop loses nothing."""
    server = RedisNode(appendonly=True).start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def r(node: RedisNode) -> AsyncIterator[Redis]:
    client = Redis.from_url(node.url)
    yield client
    await client.aclose()


async def queued(url: str, queue: str) -> int:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        return (await channel.queue_declare(queue, passive=True)).message_count
    finally:
        await conn.close()


def read_delays(output: str) -> list[float]:
    return [float(d) for d in READ_RETRY.findall(output)]


async def stop_redis_with_a_batch_before_its_ack(settings, node, r, keys, pid, users,
                                                 tap, engine, events_before: int) -> None:
    """Orders read and held at the log stage; Redis stops; the batch then logs and
    publishes, and waits for Redis to acknowledge. Returns with Redis down."""
    async with table_locked(settings.pg_dsn, "seckill_logs"):
        await push_orders(r, keys, pid, users, first_slot=users[0])

        async def read() -> bool:
            return await pending_count(r, keys, [pid]) == len(users)
        await wait_for(read, 30, "the orders read and held at the log stage")
        node.stop()
    logged = users[-1]

    async def confirmed_not_acked() -> bool:
        return (await row_count(settings, [pid]) == logged
                and await queued(settings.amqp_url, tap.queue) == events_before + len(users)
                and "batch attempt 2 failed" in engine.output())
    await wait_for(confirmed_not_acked, 60, "rows logged, events confirmed, the ack failing")

    async def backed_off() -> bool:  # the reader's waits grew to the cap
        return any(d >= BACKOFF_MAX * 0.85 for d in read_delays(engine.output()))
    await wait_for(backed_off, 60, "the reader backing off to retry_backoff_max")


async def test_reader_backs_off_and_a_failed_ack_is_redelivered_with_the_same_id(
        settings, node, r, keys, product_id):
    pid = product_id
    s = settings.replace(redis_url=node.url)
    await add_products(s, [pid])
    await announce(r, keys, pid)
    quick = dict(redis_timeout=1, retry_backoff_max=BACKOFF_MAX, node_lease_ttl_ms=120_000)
    async with EventTap(s.amqp_url) as tap:
        engine = EngineProcess(s, workers=1, **quick)
        try:
            await wait_for(lambda: engine.booted(1), 30, "the worker booted")
            worker = engine.children()

            # 1. Redis comes back: the held batch is acknowledged in place, the reader
            #    resumes, nobody exited or respawned
            await stop_redis_with_a_batch_before_its_ack(
                s, node, r, keys, pid, list(range(1, 201)), tap, engine, 0)
            delays = read_delays(engine.output())
            capped = next(i for i, d in enumerate(delays) if d >= BACKOFF_MAX * 0.85)
            assert capped <= 8, f"no backoff: {capped} retries before the cap ({delays})"
            node.start()
            await r.connection_pool.disconnect()  # the test's own connections died with it
            await push_orders(r, keys, pid, range(201, 301), first_slot=201)
            await wait_for(lambda: all_done(s, r, keys, [pid], 300), 60,
                           "the held batch acknowledged and new orders processed")
            assert engine.children() == worker and "exited with" not in engine.output(), \
                "a worker exited during the outage"

            # 2. the engine dies while the ack cannot be sent: the next engine's worker
            #    (same slot, same consumer) redelivers those entries
            await stop_redis_with_a_batch_before_its_ack(
                s, node, r, keys, pid, list(range(301, 501)), tap, engine, 300)
            engine.signal(signal.SIGQUIT)  # workers exit at once, acks unsent
            assert engine.wait(30) == 0
        finally:
            engine.stop()
        node.start()
        await r.connection_pool.disconnect()
        assert await pending_count(r, keys, [pid]) == 200
        engine = EngineProcess(s, workers=1, **quick)
        try:
            await wait_for(lambda: all_done(s, r, keys, [pid], 500), 60,
                           "the unacknowledged batch redelivered and acknowledged")
        finally:
            engine.stop()
        events = await tap.collect(700, timeout=60)
    rows = await log_rows(s, [pid])
    assert len(rows) == 500
    ids = {(row["product_id"], row["stream_id"]): row["instance_id"] for row in rows}
    assert len(set(ids.values())) == 500
    per_order = collections.Counter((e.product_id, e.stream_id) for e in events)
    assert set(per_order) == set(ids)
    assert all(ids[(e.product_id, e.stream_id)] == e.instance_id for e in events), \
        "a redelivered order was published with a second instance ID"
    by_user = {row["stream_id"]: row["user_id"] for row in rows}
    twice = {by_user[k[1]] for k, n in per_order.items() if n == 2}
    once = {by_user[k[1]] for k, n in per_order.items() if n == 1}
    assert twice == set(range(301, 501)), "only the unacknowledged batch is published again"
    assert once == set(range(1, 301))
