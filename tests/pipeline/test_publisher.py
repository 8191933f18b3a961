"""Stage 4 against the real RabbitMQ: framing, confirms, returns."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator

import aiormq
import pamqp.frame
import pytest
from pamqp import commands, header
from pamqp.body import ContentBody

from engine.amqp.framing import PERSISTENT, Framer, table
from engine.amqp.publisher import CONFIRMED, RETURNED, ConfirmPublisher, Message
from engine.amqp.topology import CONTENT_TYPE, EXCHANGE, QUEUE_CREATED, RK_CREATED
from engine.errors import PublishFailed
from engine.testing.waits import wait_for


def test_framer_matches_pamqp_byte_for_byte():
    framer = Framer.create(3, EXCHANGE, RK_CREATED, "INSTANCE_CREATED")
    body = b"\x08\x01payload" * 20
    import datetime as dt
    ts = 1_700_000_123
    props = commands.Basic.Properties(
        content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, message_id="123456789",
        timestamp=dt.datetime.fromtimestamp(ts, dt.UTC),
        message_type="INSTANCE_CREATED")
    expected = io.BytesIO()
    for frame in (commands.Basic.Publish(exchange=EXCHANGE, routing_key=RK_CREATED,
                                         mandatory=True),
                  header.ContentHeader(0, len(body), props), ContentBody(body)):
        expected.write(pamqp.frame.marshal(frame, 3))
    assert framer.publish(body, "123456789", ts) == expected.getvalue()


def test_framer_names_the_user_as_pamqp_would():
    """The user-id property, which the consumers trust, in the pre-encoded frames too."""
    framer = Framer.create(1, EXCHANGE, RK_CREATED, "INSTANCE_CREATED", user_id="seckill_engine")
    body = b"event"
    import datetime as dt
    props = commands.Basic.Properties(
        content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, message_id="42",
        timestamp=dt.datetime.fromtimestamp(1_700_000_000, dt.UTC),
        message_type="INSTANCE_FAILED", user_id="seckill_engine")
    expected = io.BytesIO()
    for frame in (commands.Basic.Publish(exchange=EXCHANGE, routing_key=RK_CREATED,
                                         mandatory=True),
                  header.ContentHeader(0, len(body), props), ContentBody(body)):
        expected.write(pamqp.frame.marshal(frame, 1))
    assert framer.publish(body, "42", 1_700_000_000, b"\x0fINSTANCE_FAILED") == \
        expected.getvalue()


@pytest.mark.parametrize("fast", [True, False])
async def test_confirmed_publishes_arrive_with_properties(settings, fast):
    queue = f"test-pub-{uuid.uuid4().hex[:8]}"
    conn = await aiormq.connect(settings.amqp_url)
    ch = await conn.channel()
    await ch.queue_declare(queue, exclusive=True)
    await ch.queue_bind(queue, EXCHANGE, routing_key=RK_CREATED)
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED", fast=fast)
    try:
        msgs = [Message(f"body-{i}".encode(), str(10**12 + i)) for i in range(300)]
        outcomes = await publisher.publish(msgs, timeout=10)
        assert outcomes == [CONFIRMED] * 300
        got = []
        for _ in range(300):
            m = await ch.basic_get(queue, no_ack=True)
            got.append(m)
        assert [m.body for m in got] == [m.body for m in msgs]
        p = got[0].header.properties
        assert (p.delivery_mode, p.content_type, p.message_type, p.message_id) == (
            2, CONTENT_TYPE, "INSTANCE_CREATED", str(10**12))
        assert p.user_id == settings.amqp_engine_user
        assert p.timestamp is not None
    finally:
        await publisher.close()
        await conn.close()


@contextlib.asynccontextmanager
async def unrouted(settings) -> AsyncIterator[str]:
    """RK_CREATED with no queue bound for a while: the only key the engine's broker user
    may publish with, so the broker returns the events instead of refusing the user."""
    conn = await aiormq.connect(settings.amqp_url)  # the administrator
    try:
        ch = await conn.channel()
        await ch.queue_unbind(QUEUE_CREATED, EXCHANGE, routing_key=RK_CREATED)
        try:
            yield RK_CREATED
        finally:
            await ch.queue_bind(QUEUE_CREATED, EXCHANGE, routing_key=RK_CREATED)
    finally:
        await conn.close()


@pytest.fixture
async def unroutable(settings):
    async with unrouted(settings) as key:
        yield key


@pytest.mark.parametrize("fast", [True, False])
async def test_unroutable_events_are_returned_not_confirmed(settings, fast, unroutable):
    publisher = ConfirmPublisher(settings, unroutable, "INSTANCE_CREATED", fast=fast)
    try:
        outcomes = await publisher.publish([Message(b"x", "1"), Message(b"y", "2")], 10)
    finally:
        await publisher.close()
    assert outcomes == [RETURNED, RETURNED]


async def test_publisher_reconnects_after_its_connection_dies(settings):
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED")
    try:
        await publisher.connect()
        await publisher._conn.close()
        assert not publisher.connected
        assert await publisher.publish([Message(b"x", "5")], 10) == [CONFIRMED]
    finally:
        await publisher.close()


@pytest.mark.parametrize("routed", [True, False])
async def test_batches_leave_no_bookkeeping_behind(settings, routed):
    """Confirmed or returned, a batch's entries leave aiormq's maps (no slow leak)."""
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED")
    route = contextlib.nullcontext(RK_CREATED) if routed else unrouted(settings)
    try:
        async with route:
            for start in range(0, 2000, 500):
                await publisher.publish([Message(b"x", str(10**9 + i))
                                         for i in range(start, start + 500)], 10)
        channel = publisher._channel
        assert len(channel.confirmations) == 0
        assert len(channel.message_id_delivery_tag) == 0
    finally:
        await publisher.close()


async def test_a_busy_channel_fails_the_publish_by_its_deadline(settings):
    """The channel lock and the write queue are waits on the broker too: bounded by the
    publish timeout, after which the channel (its bookkeeping now unsure) is dropped."""
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED")
    try:
        await publisher.connect()
        async with publisher._channel.lock:
            with pytest.raises(PublishFailed, match="publish timeout"):
                await asyncio.wait_for(publisher.publish([Message(b"x", "7")], 0.3), 30)
        assert not publisher.connected
        assert await publisher.publish([Message(b"y", "8")], 10) == [CONFIRMED]
    finally:
        await publisher.close()


async def test_concurrent_batches_share_one_reconnect(settings, monkeypatch):
    """Batches in flight find the connection gone at about the same moment: one of them
    reconnects, the others wait for it, and every batch is confirmed on the new channel."""
    import engine.amqp.publisher as publisher_module

    opened = []
    reconnecting, release = asyncio.Event(), asyncio.Event()
    real_connect = publisher_module.connect_amqp

    async def held_connect(s):
        conn = await real_connect(s)
        opened.append(conn)
        if len(opened) == 2:  # the reconnect: held until every other batch has come
            reconnecting.set()
            await release.wait()
        return conn

    monkeypatch.setattr(publisher_module, "connect_amqp", held_connect)
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED")

    async def batch(i: int) -> list[str]:
        return await publisher.publish([Message(b"x", f"m{i}")], 10)

    try:
        await publisher.connect()
        first = publisher._conn
        await first.close()  # as a broker restart would
        assert not publisher.connected
        batches = [asyncio.create_task(batch(0))]
        await asyncio.wait_for(reconnecting.wait(), 10)  # batch 0 is reconnecting
        batches += [asyncio.create_task(batch(i)) for i in range(1, 8)]

        async def the_others_came() -> bool:
            # each waits for the reconnect (or, were it not shared, opens one of its own)
            waiting = len(publisher._connecting._waiters or ())
            return waiting + len(opened) - 2 == 7
        await wait_for(the_others_came, 10, "seven batches behind the reconnect",
                       interval=0.01)
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*batches), 30)
        assert outcomes == [[CONFIRMED]] * 8
        assert len(opened) == 2  # the first connect, then one reconnect for all eight
        assert publisher.connected and publisher._conn is opened[1]
    finally:
        release.set()
        await publisher.close()
        for conn in opened:
            await conn.close()


def test_framer_writes_a_headers_table_as_pamqp_would():
    """A sampled order's event carries its trace context in the headers table."""
    import datetime as dt

    framer = Framer.create(2, EXCHANGE, RK_CREATED, "INSTANCE_CREATED", user_id="seckill_engine")
    body = b"event"
    carried = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               "tracestate": "vendor=é"}
    props = commands.Basic.Properties(
        content_type=CONTENT_TYPE, headers=carried, delivery_mode=PERSISTENT,
        message_id="7", timestamp=dt.datetime.fromtimestamp(1_700_000_000, dt.UTC),
        message_type="INSTANCE_CREATED", user_id="seckill_engine")
    expected = io.BytesIO()
    for frame in (commands.Basic.Publish(exchange=EXCHANGE, routing_key=RK_CREATED,
                                         mandatory=True),
                  header.ContentHeader(0, len(body), props), ContentBody(body)):
        expected.write(pamqp.frame.marshal(frame, 2))
    assert framer.publish(body, "7", 1_700_000_000, None, table(carried)) == \
        expected.getvalue()


@pytest.mark.parametrize("fast", [True, False])
async def test_headers_reach_the_consumer_on_either_path(settings, fast):
    """The framed path and aiormq's basic_publish alike carry a message's headers, and
    a message without them carries none."""
    publisher = ConfirmPublisher(settings, RK_CREATED, "INSTANCE_CREATED", fast=fast)
    carried = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    queue = f"test-pub-{uuid.uuid4().hex[:8]}"
    conn = await aiormq.connect(settings.amqp_url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(queue, exclusive=True)
        await channel.queue_bind(queue, EXCHANGE, routing_key=RK_CREATED)
        outcomes = await publisher.publish(
            [Message(b"a", "1", headers=carried), Message(b"b", "2")], 10)
        assert outcomes == [CONFIRMED, CONFIRMED]
        got = {}
        for _ in range(2):
            message = await channel.basic_get(queue, no_ack=True)
            headers = message.header.properties.headers or {}
            got[message.header.properties.message_id] = headers.get("traceparent")
        assert got == {"1": carried["traceparent"], "2": None}
    finally:
        await publisher.close()
        await conn.close()


def test_a_batch_frames_its_sampled_publishes_among_the_others():
    """The batch encoding for the plain runs, a sampled order's publish with its headers
    between them: byte for byte the publishes one by one."""
    from engine.amqp.publisher import _Batch, _frames

    framer = Framer.create(1, EXCHANGE, RK_CREATED, "INSTANCE_CREATED", user_id="seckill_engine")
    bodies, ids = [b"a", b"bb", b"ccc", b"dddd"], ["1", "2", "3", "4"]
    carried = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    every = dict.fromkeys(range(4), carried)
    for sampled in ({}, {0: carried}, {2: carried}, {3: carried}, {1: carried, 3: carried},
                    every):
        one_by_one = b"".join(framer.publish(b, i, 1_700_000_000, None,
                                             table(sampled[n]) if n in sampled else b"")
                              for n, (b, i) in enumerate(zip(bodies, ids, strict=True)))
        batch = _Batch.of(bodies, ids, sampled or None)
        assert _frames(framer, batch, 1_700_000_000) == one_by_one
