"""The message bus is a trust boundary: who may publish what, and what each consumer
believes. Reproduces the attacks of issue 21 (High) against the real RabbitMQ: a
failure report for a victim's instance published by another broker user, a report
naming the wrong order, and a forged INSTANCE_CREATED for a miner."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiormq
import asyncpg
import pytest
from prometheus_client import REGISTRY
from statusreports import log_orders, owners, publish, rows

from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, login
from engine.amqp.topology import (
    EXCHANGE,
    QUEUE_CREATED,
    QUEUE_STATUS,
    RK_CREATED,
    RK_STATUS,
)
from engine.fulfilment.status_consumer import StatusConsumer, encode_report
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.orderstates import FAILED, PROCESSING, RUNNING
from engine.pb import event_pb2
from engine.resource_domain.service import ResourceDomain
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


def counted(metric: str, reason: str) -> float:
    return REGISTRY.get_sample_value(metric, {"reason": reason}) or 0.0


async def publish_as(url: str, body: bytes, routing_key: str, user_id: str | None) -> None:
    """One confirmed publish on `url`'s login, naming `user_id` (or no user)."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        await channel.basic_publish(body, exchange=EXCHANGE, routing_key=routing_key,
                                    properties=aiormq.spec.Basic.Properties(user_id=user_id))
    finally:
        await conn.close()


async def running(consumer, stopping: asyncio.Event) -> asyncio.Task:
    return asyncio.create_task(consumer.run(stopping))


async def test_a_failure_report_from_another_broker_user_is_dead_lettered(settings, env,
                                                                        product_id):
    """The attack as reproduced: INSTANCE_FAILED for the victim's instance, right user and
    product (read from INSTANCE_CREATED), published by a user that is not the Resource
    Domain's: the order must stay PROCESSING and its unit must not be resold."""
    redis, pool, bus = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 1)
    [victim] = await log_orders(pool, gate, product_id, [1])
    forged = encode_report(victim.instance_id, FAILED, reason="forged",
                           **owners([victim])[victim.instance_id])
    admin = urlsplit(settings.amqp_url).username
    before = counted("seckill_status_dead_letters_total", "untrusted_sender")
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = await running(consumer, stopping)
    try:
        await publish_as(settings.amqp_url, forged, RK_STATUS, None)
        await publish_as(settings.amqp_url, forged, RK_STATUS, admin)

        async def refused() -> bool:
            return await redis.xlen(keys.status_dlq) == 2
        await wait_for(refused, 20, "both forged reports dead-lettered")
        row = (await rows(pool, product_id))[victim.instance_id]
        assert (row["status"], row["compensated_at"]) == (PROCESSING, None)
        assert int(await redis.get(keys.stock(product_id))) == 0  # nothing handed back
        assert (await gate.buy(product_id, 2)).outcome == "sold_out"
        # the Resource Domain's own report still counts
        ep = f"https://{victim.instance_id}.{settings.rd_domain}"
        await publish(bus, encode_report(victim.instance_id, RUNNING, endpoint=ep,
                                         **owners([victim])[victim.instance_id]))

        async def applied() -> bool:
            return (await rows(pool, product_id))[victim.instance_id]["status"] == RUNNING
        await wait_for(applied, 20, "the Resource Domain's report applied")
    finally:
        stopping.set()
        await task
    letters = [f for _, f in await redis.xrange(keys.status_dlq)]
    assert {f[b"reason"] for f in letters} == {b"untrusted_sender"}
    assert {f[b"sender"] for f in letters} == {b"", admin.encode()}
    assert counted("seckill_status_dead_letters_total", "untrusted_sender") == before + 2
    queued = await bus.queue_declare(QUEUE_STATUS, passive=True)
    assert queued.message_count == 0  # dead-lettered means acknowledged, not redelivered


async def test_the_broker_refuses_a_message_naming_another_user(settings):
    """The consumers' trust rests on this: the broker checks user-id against the login, so
    even the administrator cannot publish in the Resource Domain's name."""
    with pytest.raises(aiormq.exceptions.AMQPError, match="user_id"):
        await publish_as(settings.amqp_url, b"x", RK_STATUS, settings.amqp_rd_user)


async def refused(url: str, action) -> str:
    """What the broker says when `url`'s user tries `action(channel)`; '' if it may."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        try:
            await asyncio.wait_for(action(channel), 10)
        except aiormq.exceptions.AMQPError as exc:
            return str(exc)
        return ""
    finally:
        await conn.close()


def publishing(routing_key: str):
    return lambda ch: ch.basic_publish(b"x", exchange=EXCHANGE, routing_key=routing_key,
                                       properties=aiormq.spec.Basic.Properties())


def consuming(queue: str):
    async def consume(ch):
        await ch.basic_consume(queue, lambda message: None)
    return consume


def declaring(ch):
    return ch.queue_declare("seckill-test-intruder", auto_delete=True)


def binding(ch):
    return ch.queue_bind(QUEUE_STATUS, EXCHANGE, routing_key="#")


async def test_each_component_may_publish_and_read_only_its_own_part(settings):
    engine, rd = login(settings, ENGINE).url, login(settings, RESOURCE_DOMAIN).url
    # the engine: no status reports, no reading the Resource Domain's inbox, no topology
    assert "ACCESS_REFUSED" in await refused(engine, publishing(RK_STATUS))
    assert "ACCESS_REFUSED" in await refused(engine, publishing("instance.anything"))
    assert "ACCESS_REFUSED" in await refused(engine, consuming(QUEUE_CREATED))
    assert "ACCESS_REFUSED" in await refused(engine, declaring)
    assert "ACCESS_REFUSED" in await refused(engine, binding)
    # the Resource Domain: no instance orders, no reading the engine's status queue
    assert "ACCESS_REFUSED" in await refused(rd, publishing(RK_CREATED))
    assert "ACCESS_REFUSED" in await refused(rd, consuming(QUEUE_STATUS))
    assert "ACCESS_REFUSED" in await refused(rd, declaring)
    assert "ACCESS_REFUSED" in await refused(rd, binding)
    # and each may do its own part
    assert await refused(engine, consuming(QUEUE_STATUS)) == ""
    assert await refused(rd, consuming(QUEUE_CREATED)) == ""


async def test_a_report_naming_another_user_or_product_is_dead_lettered(settings, env,
                                                                       product_id):
    """Instance IDs are guessable: a report (even the Resource Domain's) that names a
    victim's instance with another user or product is never applied."""
    redis, pool, bus = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 5)
    [victim] = await log_orders(pool, gate, product_id, [1])
    wrong_user = encode_report(victim.instance_id, FAILED, reason="x", user_id=666,
                               product_id=product_id)
    wrong_product = encode_report(victim.instance_id, FAILED, reason="x", user_id=1,
                                  product_id=product_id + 1)
    no_owner = encode_report(victim.instance_id, FAILED, reason="x")
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = await running(consumer, stopping)
    try:
        for body in (wrong_user, wrong_product, no_owner):
            await publish(bus, body)

        async def refused() -> bool:
            return await redis.xlen(keys.status_dlq) == 3
        await wait_for(refused, 20, "three mismatched reports dead-lettered")
    finally:
        stopping.set()
        await task
    row = (await rows(pool, product_id))[victim.instance_id]
    assert (row["status"], row["reason"], row["compensated_at"]) == (PROCESSING, None, None)
    letters = [f for _, f in await redis.xrange(keys.status_dlq)]
    assert {f[b"reason"] for f in letters} == {b"report_mismatch"}
    assert int(await redis.get(keys.stock(product_id))) == 4  # nothing handed back


async def test_a_report_for_a_final_order_changes_nothing(settings, env, product_id):
    """RUNNING is final: a later FAILED, even the Resource Domain's, changes nothing and
    hands no unit back."""
    redis, pool, bus = env
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 1)
    [order] = await log_orders(pool, gate, product_id, [1])
    of = owners([order])[order.instance_id]
    ep = f"https://{order.instance_id}.{settings.rd_domain}"
    now = int(time.time())
    consumer = StatusConsumer(settings, redis, pool)
    stopping = asyncio.Event()
    task = await running(consumer, stopping)
    try:
        await publish(bus, encode_report(order.instance_id, RUNNING, endpoint=ep,
                                         timestamp=now, **of))

        async def is_running() -> bool:
            return (await rows(pool, product_id))[order.instance_id]["status"] == RUNNING
        await wait_for(is_running, 20, "the order RUNNING")
        await publish(bus, encode_report(order.instance_id, FAILED, reason="later",
                                         timestamp=now + 60, **of))

        async def settled() -> bool:
            queued = await bus.queue_declare(QUEUE_STATUS, passive=True)
            return queued.message_count == 0 and not consumer.consumer._unacked
        await wait_for(settled, 20, "the late report acknowledged")
    finally:
        stopping.set()
        await task
    row = (await rows(pool, product_id))[order.instance_id]
    assert (row["status"], row["endpoint"], row["reason"]) == (RUNNING, ep, None)
    assert row["compensated_at"] is None
    assert int(await redis.get(keys.stock(product_id))) == 0
    assert await redis.xlen(keys.status_dlq) == 0


def miner(instance_id: int) -> event_pb2.Event:
    return event_pb2.Event(
        event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id, user_id=31337,
        product_id=1, name="free GPU", timestamp=int(time.time()),
        spec=event_pb2.InstanceSpec(cpus=96, memory_mb=1 << 20, gpu="H100",
                                    image="attacker.example/miner:latest"))


async def test_the_resource_domain_provisions_only_the_engines_events(settings, tmp_path,
                                                                     fresh_queues):
    """A forged INSTANCE_CREATED (a user with no order, a miner image, 96 CPUs, an H100)
    from any user but the engine's: kept with its reason, never provisioned."""
    s = settings.replace(rd_output_dir=str(tmp_path), rd_delay_ms=1, rd_metrics_port=0)
    base = int(time.time() * 1000) << 22
    forged, honest = base + 1, base + 2
    before = counted("seckill_rd_dead_letters_total", "untrusted_sender")
    admin = urlsplit(settings.amqp_url).username
    domain = ResourceDomain(s)
    stopping = asyncio.Event()
    task = await running(domain, stopping)
    pg = await asyncpg.connect(s.rd_dsn())
    body = miner(forged).SerializeToString()
    try:
        await publish_as(settings.amqp_url, body, RK_CREATED, None)
        await publish_as(settings.amqp_url, body, RK_CREATED, admin)
        engine = login(settings, ENGINE)
        await publish_as(engine.url, miner(honest).SerializeToString(), RK_CREATED, engine.user)

        async def judged() -> bool:
            try:
                done = await pg.fetchval("SELECT count(*) FROM resource_domain.instances "
                                         "WHERE instance_id = $1 AND status <> 'PROVISIONING'",
                                         honest)
            except asyncpg.UndefinedTableError:  # a new database: the RD makes it at start
                return False
            return done == 1 and counted("seckill_rd_dead_letters_total",
                                         "untrusted_sender") == before + 2
        await wait_for(judged, 30, "the forged events refused, the engine's provisioned")
        letters = await pg.fetch("SELECT reason, sender, body FROM resource_domain.dead_letters "
                                 "WHERE body = $1", body)
    finally:
        stopping.set()
        await task
        await pg.close()
    assert sorted((r["reason"], r["sender"]) for r in letters) == [
        ("untrusted_sender", ""), ("untrusted_sender", admin)]
    assert not (tmp_path / f"{forged}.yaml").exists()  # no manifest of the miner
    assert (tmp_path / f"{honest}.yaml").exists()
    pg = await asyncpg.connect(s.rd_dsn())
    try:
        assert await pg.fetchval("SELECT count(*) FROM resource_domain.instances WHERE "
                                 "instance_id = $1", forged) == 0
    finally:
        await pg.close()
