"""A tap keeps every event published while it is bound, reads it three ways, and goes
when deleted."""

from __future__ import annotations

import asyncio
import time

import aiormq
import pytest

from engine.amqp.topology import EXCHANGE, RK_CREATED
from engine.pb import event_pb2
from engine.testing.ports import free_port
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import wait_for


def created(pid: int, stream_id: str, instance_id: int) -> event_pb2.Event:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id,
                           user_id=1, name="GPU instance", timestamp=int(time.time()),
                           product_id=pid, stream_id=stream_id, sale_id="sale-1")


async def publish(url: str, *events: event_pb2.Event) -> None:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        for event in events:
            await channel.basic_publish(
                event.SerializeToString(), exchange=EXCHANGE, routing_key=RK_CREATED,
                properties=aiormq.spec.Basic.Properties(
                    delivery_mode=2, message_type="INSTANCE_CREATED",
                    message_id=str(event.instance_id)))
    finally:
        await conn.close()


def mine(events: list, pid: int) -> list[tuple[str, int]]:
    """(stream ID, instance ID) of the events of product `pid`, sorted."""
    return sorted((e.stream_id, e.instance_id) for e in events if e.product_id == pid)


async def queue_exists(url: str, queue: str) -> bool:
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(queue, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await conn.close()


async def test_a_tap_keeps_every_event_until_it_is_deleted(settings, product_id):
    url, pid = settings.amqp_url, product_id
    expected = [("1-1", 11), ("1-2", 12), ("1-3", 13)]
    async with EventTap(url) as tap:
        await publish(url, *(created(pid, s, i) for s, i in expected))
        assert mine(await tap.peek(idle=1.0), pid) == expected
        assert mine(await tap.peek(idle=1.0), pid) == expected  # nothing was taken
        got = await tap.collect(3, timeout=30)
        assert mine(got, pid) == expected
        properties = [p for p, e in tap.events if e.product_id == pid]
        assert {p.message_type for p in properties} == {"INSTANCE_CREATED"}
        assert mine(await tap.peek(idle=0.5), pid) == []  # collected: acknowledged
        assert await queue_exists(url, tap.queue)
    assert not await queue_exists(url, tap.queue)


async def test_collect_orders_waits_for_distinct_orders_not_events(settings, product_id):
    url, pid = settings.amqp_url, product_id
    async with EventTap(url) as tap:
        # the first order's event twice (a redelivery after an outage): one order so far
        await publish(url, created(pid, "1-1", 11), created(pid, "1-1", 11))
        collecting = asyncio.create_task(collect_orders(tap, 2, timeout=30))
        await wait_for(lambda: arrived(tap, 2), 30, "both events consumed", interval=0.02)
        done, _ = await asyncio.wait({collecting}, timeout=1.0)
        assert not done, "collect_orders returned on two events of one order"
        await publish(url, created(pid, "1-2", 12))
        got = await collecting
    assert mine(got, pid) == [("1-1", 11), ("1-1", 11), ("1-2", 12)]


async def arrived(tap: EventTap, n: int) -> bool:
    return len(tap.events) >= n


async def test_a_tap_named_by_its_caller_and_expiring_is_declared_as_asked(settings):
    tap = EventTap(settings.amqp_url, queue="test-tap-named", expires_ms=60_000)
    await tap.declare()
    try:
        assert tap.queue == "test-tap-named"
        assert await queue_exists(settings.amqp_url, "test-tap-named")
    finally:
        await tap.delete()


async def test_deleting_a_tap_on_a_broker_that_is_gone_is_quiet():
    await EventTap(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", queue="gone").delete()


@pytest.mark.timeout(60)
async def test_collect_returns_what_came_by_the_timeout(settings, product_id):
    async with EventTap(settings.amqp_url) as tap:
        await publish(settings.amqp_url, created(product_id, "1-1", 11))
        got = await tap.collect(5, timeout=2)
    assert mine(got, product_id) == [("1-1", 11)]
