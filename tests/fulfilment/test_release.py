"""Release, one component at a time on the real services: the engine's release task
(requests -> RELEASING rows -> INSTANCE_RELEASED), the Resource Domain's release
consumer (delete, report RELEASED) and the status consumer (RELEASED, the unit handed
on once). The whole loop as processes is test_release_loop.py."""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlsplit

import asyncpg
import pytest
from statusreports import log_orders, owners, publish, rows
from support import count_commands, purge_queues
from test_bus_trust import consuming, publish_as, publishing, refused

from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, login
from engine.amqp.topology import QUEUE_RELEASED, RK_CREATED, RK_RELEASED, RK_STATUS
from engine.fulfilment.releases import ReleaseRequests, parse
from engine.fulfilment.status_consumer import StatusConsumer, encode_report
from engine.gate.redis_gate import Gate
from engine.keys import GROUP, Keys
from engine.orderstates import FAILED, RELEASED, RELEASING, RUNNING
from engine.pb import event_pb2
from engine.resource_domain.provisioning import ProvisioningFailed, SimulatedProvisioner
from engine.resource_domain.service import ResourceDomain
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


async def running_orders(pool, gate: Gate, pid: int, users: list[int]):
    orders = await log_orders(pool, gate, pid, users)
    await pool.execute("UPDATE seckill_logs SET status = 'RUNNING' WHERE product_id = $1", pid)
    return orders


def request(order, **override) -> dict[str, str]:
    fields = {"uid": str(order.user_id), "instance_id": str(order.instance_id),
              "stream_id": order.stream_id, "sale": order.sale_id or "",
              "at": str(int(time.time() * 1000))}
    fields.update(override)
    return {k: v for k, v in fields.items() if v is not None}


def test_a_request_needs_its_fields_as_numbers():
    assert parse(b"1-1", {b"uid": b"5", b"instance_id": b"9", b"stream_id": b"1-2"}).user_id == 5
    for fields, why in (({b"uid": b"5", b"stream_id": b"1-2"}, "missing instance_id"),
                        ({b"uid": b"x", b"instance_id": b"9", b"stream_id": b"1-2"}, "uid"),
                        ({b"uid": b"5", b"instance_id": b"-9", b"stream_id": b"1-2"},
                         "instance_id"),
                        ({b"uid": b"5", b"instance_id": b"9", b"stream_id": b"nope"},
                         "stream_id")):
        refusal = parse(b"1-1", fields)
        assert refusal.reason == "bad_request" and why in refusal.detail  # type: ignore[union-attr]


async def test_the_engine_asks_for_the_owners_releases_only(settings, env, product_id):
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 10)
    a, b, c, d = await running_orders(pool, gate, product_id, [1, 2, 3, 4])
    await pool.execute("UPDATE seckill_logs SET status = 'FAILED' WHERE instance_id = $1",
                       d.instance_id)
    stream = keys.releases(product_id)
    for fields in (request(a), request(a),  # a second DELETE: one event is enough
                   request(b, uid="3"),  # not b's owner
                   request(c, stream_id="1-1"),  # not c's order
                   request(d),  # FAILED: nothing to release
                   {"uid": "5", "stream_id": "1-1"},  # no instance
                   request(c, instance_id="12x")):
        await redis.xadd(stream, fields)
    releases = ReleaseRequests(settings, redis, pool, keys, "test-0")
    stopping = asyncio.Event()
    async with EventTap(settings.amqp_url, RK_RELEASED) as tap:
        task = asyncio.create_task(releases.run(stopping))
        try:
            events = await tap.collect(1, timeout=30)

            async def settled() -> bool:
                pending = await redis.xpending(stream, GROUP)
                return pending["pending"] == 0 and await redis.xlen(keys.release_dlq(
                    product_id)) == 5
            await wait_for(settled, 30, "every request acknowledged or dead-lettered")
        finally:
            stopping.set()
            await task
        (props, event), = tap.events
    assert [e.instance_id for e in events] == [a.instance_id]
    assert event.event_type == event_pb2.INSTANCE_RELEASED and event.user_id == 1
    assert (event.product_id, event.stream_id, event.slot) == (product_id, a.stream_id, a.slot)
    assert props.user_id == login(settings, ENGINE).user and props.delivery_mode == 2
    assert props.message_type == "INSTANCE_RELEASED"
    r = await rows(pool, product_id)
    assert [r[o.instance_id]["status"] for o in (a, b, c, d)] == [
        RELEASING, RUNNING, RUNNING, FAILED]
    letters = await redis.xrange(keys.release_dlq(product_id))
    assert sorted(f[b"reason"].decode() for _, f in letters) == [
        "bad_request", "bad_request", "not_owner", "not_owner", "not_running"]


async def test_a_redelivered_request_is_published_again_a_released_one_is_not(
        settings, env, product_id):
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 10)
    a, b = await running_orders(pool, gate, product_id, [1, 2])
    await pool.execute("UPDATE seckill_logs SET status = 'RELEASING' WHERE instance_id = $1",
                       a.instance_id)  # asked before a crash: the request still pending
    await pool.execute("UPDATE seckill_logs SET status = 'RELEASED' WHERE instance_id = $1",
                       b.instance_id)
    for order in (a, b):
        await redis.xadd(keys.releases(product_id), request(order))
    releases = ReleaseRequests(settings, redis, pool, keys, "test-0")
    async with EventTap(settings.amqp_url, RK_RELEASED) as tap:
        await releases.discover()
        for _ in range(2):  # our own pending requests first (none), then the new ones
            for pid, items in await releases.read():
                await releases.settle(pid, items)
        await releases.publisher.close()
        events = await tap.collect(1, timeout=10)
        assert await tap.peek(idle=1) == []
    assert [e.instance_id for e in events] == [a.instance_id]
    assert (await redis.xpending(keys.releases(product_id), GROUP))["pending"] == 0


async def test_a_released_report_hands_the_unit_on_once(settings, env, product_id):
    redis, pool, bus = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 2)
    a, b = await running_orders(pool, gate, product_id, [1, 2])
    await pool.execute("UPDATE seckill_logs SET status = 'RELEASING' WHERE instance_id = $1",
                       a.instance_id)
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    who = owners([a, b])
    try:
        for _ in range(2):  # the second is a duplicate: acknowledged, nothing handed
            await publish(bus, encode_report(a.instance_id, RELEASED, **who[a.instance_id]))
        # b is RUNNING: nobody asked for its release
        await publish(bus, encode_report(b.instance_id, RELEASED, **who[b.instance_id]))

        async def settled() -> bool:
            q = await bus.queue_declare("product-service.instance-status", passive=True)
            return (q.message_count == 0 and await redis.xlen(keys.status_dlq) >= 1
                    and (await rows(pool, product_id))[a.instance_id]["compensated_at"]
                    is not None)
        await wait_for(settled, 30, "the reports applied or refused")
        await asyncio.sleep(0.5)  # a second hand-off would come now
    finally:
        stopping.set()
        await task
    r = await rows(pool, product_id)
    assert r[a.instance_id]["status"] == RELEASED and r[a.instance_id]["released_at"]
    assert r[b.instance_id]["status"] == RUNNING
    assert int(await redis.get(keys.stock(product_id))) == 1  # nobody waits: back to stock
    letters = [f for _, f in await redis.xrange(keys.status_dlq)
               if f.get(b"instance_id") == str(b.instance_id).encode()]
    assert [f[b"reason"] for f in letters] == [b"release_out_of_order"]


def created(instance_id: int, user_id: int) -> event_pb2.Event:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id,
                           user_id=user_id, product_id=1, stream_id="1-1",
                           timestamp=int(time.time()),
                           spec=event_pb2.InstanceSpec(cpus=2, memory_mb=1024, image="busybox"))


def release_of(instance_id: int, user_id: int) -> bytes:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_RELEASED, instance_id=instance_id,
                           user_id=user_id, product_id=1, stream_id="1-1",
                           timestamp=int(time.time())).SerializeToString()


async def test_the_resource_domain_deletes_a_released_instance_once(settings, tmp_path,
                                                                   fresh_queues):
    s = settings.replace(rd_output_dir=str(tmp_path), rd_delay_ms=1, rd_metrics_port=0)
    base = int(time.time() * 1000) << 22
    mine, foreign = base + 1, base + 2
    engine = login(settings, ENGINE)
    admin = urlsplit(settings.amqp_url).username
    domain = ResourceDomain(s)
    stopping = asyncio.Event()
    pg = await asyncpg.connect(s.rd_dsn())

    async def state(instance_id: int) -> str | None:
        return await pg.fetchval("SELECT status FROM resource_domain.instances WHERE "
                                 "instance_id = $1", instance_id)

    async with EventTap(settings.amqp_url, RK_STATUS) as tap:
        task = asyncio.create_task(domain.run(stopping))
        try:
            for iid in (mine, foreign):
                await publish_as(engine.url, created(iid, 7).SerializeToString(), RK_CREATED,
                                 engine.user)
            await tap.collect(2, timeout=30)
            assert (tmp_path / f"{mine}.yaml").exists()
            await publish_as(settings.amqp_url, release_of(foreign, 7), RK_RELEASED, admin)
            await publish_as(engine.url, release_of(foreign, 8), RK_RELEASED, engine.user)
            for _ in range(2):  # delivered twice: RELEASED reported twice, deleted once
                await publish_as(engine.url, release_of(mine, 7), RK_RELEASED, engine.user)
            reports = await tap.collect(4, timeout=30)
        finally:
            stopping.set()
            await task
    released = [e for e in reports if e.event_type == event_pb2.INSTANCE_RELEASED]
    assert [e.instance_id for e in released] == [mine, mine]
    assert released[0].user_id == 7 and released[0].stream_id == "1-1"
    assert not (tmp_path / f"{mine}.yaml").exists()
    assert (tmp_path / f"{foreign}.yaml").exists()
    assert await state(mine) == RELEASED and await state(foreign) == RUNNING
    letters = await pg.fetch("SELECT reason, body FROM resource_domain.dead_letters")
    await pg.close()
    assert sorted(r["reason"] for r in letters
                  if event_pb2.Event.FromString(r["body"]).instance_id == foreign) == [
        "release_mismatch", "untrusted_sender"]


class FailsOnce(SimulatedProvisioner):
    """The cluster refuses the first deletion (kubectl delete failing, say)."""

    failed = False

    async def release(self, event: event_pb2.Event) -> None:
        if not self.failed:
            self.failed = True
            raise ProvisioningFailed("the API server said no")
        await super().release(event)


async def test_a_release_that_failed_halfway_is_finished_by_its_own_rd(settings, tmp_path,
                                                                       fresh_queues):
    """Its claim is the live process's own: the redelivered release takes it up again."""
    s = settings.replace(rd_output_dir=str(tmp_path), rd_delay_ms=1, rd_metrics_port=0,
                         retry_backoff_max=0.5)
    iid = (int(time.time() * 1000) << 22) + 3
    engine = login(settings, ENGINE)
    provisioner = FailsOnce(s)
    domain = ResourceDomain(s, provisioner)
    stopping = asyncio.Event()
    async with EventTap(settings.amqp_url, RK_STATUS) as tap:
        task = asyncio.create_task(domain.run(stopping))
        try:
            await publish_as(engine.url, created(iid, 7).SerializeToString(), RK_CREATED,
                             engine.user)
            await tap.collect(1, timeout=30)
            await publish_as(engine.url, release_of(iid, 7), RK_RELEASED, engine.user)
            reports = await tap.collect(2, timeout=30)
        finally:
            stopping.set()
            await task
    assert provisioner.failed
    assert [e.event_type for e in reports] == [event_pb2.INSTANCE_RUNNING,
                                               event_pb2.INSTANCE_RELEASED]
    assert not (tmp_path / f"{iid}.yaml").exists()


async def test_only_the_engine_asks_for_releases_only_the_rd_reads_them(settings):
    engine, rd = login(settings, ENGINE).url, login(settings, RESOURCE_DOMAIN).url
    assert "ACCESS_REFUSED" in await refused(rd, publishing(RK_RELEASED))
    assert "ACCESS_REFUSED" in await refused(engine, consuming(QUEUE_RELEASED))
    assert await refused(rd, consuming(QUEUE_RELEASED)) == ""
    assert await refused(engine, publishing(RK_RELEASED)) == ""
    await purge_queues(settings.amqp_url, QUEUE_RELEASED)  # the engine's "x" above


async def test_a_released_report_from_anyone_but_the_rd_is_dead_lettered(settings, env,
                                                                         product_id):
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 1)
    [order] = await running_orders(pool, gate, product_id, [1])
    await pool.execute("UPDATE seckill_logs SET status = 'RELEASING' WHERE instance_id = $1",
                       order.instance_id)
    forged = encode_report(order.instance_id, RELEASED, **owners([order])[order.instance_id])
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        admin = urlsplit(settings.amqp_url).username
        await publish_as(settings.amqp_url, forged, RK_STATUS, admin)

        async def refused_it() -> bool:
            return any(f.get(b"body") == forged and f[b"reason"] == b"untrusted_sender"
                       for _, f in await redis.xrange(keys.status_dlq))
        await wait_for(refused_it, 20, "the forged RELEASED dead-lettered")
    finally:
        stopping.set()
        await task
    row = (await rows(pool, product_id))[order.instance_id]
    assert (row["status"], row["compensated_at"]) == (RELEASING, None)
    assert int(await redis.get(keys.stock(product_id))) == 0  # no unit handed on


async def test_release_streams_lost_by_redis_are_made_again(settings, env, product_id):
    """Redis restarted empty (or flushed): the next read and claim find no group; they
    make it again instead of failing on every pass."""
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    await redis.sadd(keys.streams, product_id)
    releases = ReleaseRequests(settings, redis, pool, keys, "test-0")
    await releases.discover()
    await redis.delete(keys.releases(product_id))
    assert await releases._claim_abandoned() == []
    assert await redis.xinfo_groups(keys.releases(product_id))
    await redis.delete(keys.releases(product_id))
    assert await releases.read() == []
    assert await redis.xinfo_groups(keys.releases(product_id))


async def test_an_idle_worker_reads_no_release_stream_between_sweeps(settings, env):
    """A thousand open sales and nobody releasing: each poll reads the signals (one key),
    not the release streams; those are swept every janitor_interval only."""
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    pids = random.sample(range(10**9, 9 * 10**9), 1000)
    await redis.sadd(keys.streams, *pids)
    s = settings.replace(release_poll_interval=0.02, janitor_interval=60.0,
                         discovery_interval=60.0)
    releases = ReleaseRequests(s, redis, pool, keys, "test-0")
    sent = count_commands(redis)
    stopping = asyncio.Event()
    task = asyncio.create_task(releases.run(stopping))
    try:
        async def swept() -> bool:  # our own pending requests (none), then new ones
            return sent["XREADGROUP"] >= 2
        await wait_for(swept, 30, "the start's sweep", interval=0.02)
        await asyncio.sleep(0.2)
        before = sent.copy()
        await asyncio.sleep(1.0)
        idle = sent - before
    finally:
        stopping.set()
        await task
    assert idle["XREADGROUP"] == 0, idle
    assert idle["XREAD"] >= 10, idle  # it kept polling: the signals


async def test_a_signalled_request_is_read_at_once_an_unsignalled_one_at_the_sweep(
        settings, env, product_ids):
    """The gate signals what it records: read at the next poll. A request written
    straight to the stream (its gate died before the signal) waits for the sweep."""
    redis, pool, _ = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    signalled, unsignalled = product_ids[:2]
    orders = {}
    for pid in (signalled, unsignalled):
        await gate.open_sale(pid, 1)
        [orders[pid]] = await running_orders(pool, gate, pid, [1])
    s = settings.replace(release_poll_interval=0.05, janitor_interval=4.0)
    releases = ReleaseRequests(s, redis, pool, keys, "test-0")
    stopping = asyncio.Event()
    async with EventTap(settings.amqp_url, RK_RELEASED) as tap:
        task = asyncio.create_task(releases.run(stopping))
        try:
            await asyncio.sleep(0.5)  # past the start's sweep
            await redis.xadd(keys.releases(unsignalled), request(orders[unsignalled]))
            o = orders[signalled]
            t0 = time.monotonic()
            assert await gate.record_release(signalled, 1, o.instance_id, o.stream_id,
                                             o.sale_id)
            await tap.collect(1, timeout=10)
            prompt = time.monotonic() - t0
            first, second = await tap.collect(2, timeout=10)
            swept = time.monotonic() - t0
        finally:
            stopping.set()
            await task
    assert (first.instance_id, second.instance_id) == (
        o.instance_id, orders[unsignalled].instance_id)
    assert prompt < 1.5, prompt
    assert 2.0 < swept < 7.0, swept
    assert (await redis.xpending(keys.releases(unsignalled), GROUP))["pending"] == 0
