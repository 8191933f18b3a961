"""Events the broker returns (no queue bound: mandatory publishes come back) or nacks (a
full queue with overflow=reject-publish) in the middle of a run are not acknowledged on
the stream; once the broker takes them again, every order has exactly one event, with
the instance ID of its row."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import aiormq
import pytest
from support import (
    add_products,
    all_done,
    announce,
    log_rows,
    pending_count,
    push_orders,
    row_count,
)

from engine.amqp.topology import EXCHANGE, QUEUE_CREATED, RK_CREATED
from engine.pb import event_pb2
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

UNCONFIRMED = "events not confirmed"  # what a batch retried for returns or nacks logs


class Queue:
    """A queue of the test's own on the session's vhost, consumed on demand."""

    def __init__(self, channel: Any, **arguments: Any) -> None:
        self.channel = channel
        self.name = f"test-broker-{uuid.uuid4().hex[:8]}"
        self.arguments = arguments
        self.events: list[Any] = []
        self._tag: str | None = None

    async def declare(self) -> Queue:
        await self.channel.queue_declare(self.name, durable=True, arguments=self.arguments)
        return self

    async def bind(self) -> None:
        await self.channel.queue_bind(self.name, EXCHANGE, routing_key=RK_CREATED)

    async def unbind(self) -> None:
        await self.channel.queue_unbind(self.name, EXCHANGE, routing_key=RK_CREATED)

    async def ready(self) -> int:
        return (await self.channel.queue_declare(self.name, passive=True)).message_count

    async def consume(self) -> None:
        async def on_message(message: Any) -> None:
            self.events.append(event_pb2.Event.FromString(message.body))
            await self.channel.basic_ack(message.delivery.delivery_tag)
        self._tag = (await self.channel.basic_consume(self.name, on_message)).consumer_tag

    async def delete(self) -> None:
        await self.channel.queue_delete(self.name)


def assert_exactly_one_event_each(rows: list, events: list, orders: int) -> None:
    assert len(rows) == orders
    ids = {(r["product_id"], r["stream_id"]): r["instance_id"] for r in rows}
    assert len(set(ids.values())) == orders
    per_order = collections.Counter((e.product_id, e.stream_id) for e in events)
    assert set(per_order) == set(ids), "some orders' events never arrived"
    twice = [k for k, n in per_order.items() if n > 1]
    assert not twice, f"{len(twice)} orders have more than one event"
    assert all(ids[(e.product_id, e.stream_id)] == e.instance_id for e in events), \
        "an event carries an instance ID other than its row's"


async def test_returned_then_nacked_events_are_retried_until_taken(
        settings, redis, keys, product_id):
    pid = product_id
    batch = 400
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    conn = await aiormq.connect(settings.amqp_url)
    channel = await conn.channel()
    # Nothing else may take instance.created in this vhost while we test: the setup
    # command's queue is unbound for the test and bound again after it.
    await channel.queue_unbind(QUEUE_CREATED, EXCHANGE, routing_key=RK_CREATED)
    tap = await Queue(channel).declare()  # not bound yet
    full = await Queue(channel, **{"x-max-length": 50, "x-overflow": "reject-publish"}).declare()
    engine = EngineProcess(settings, workers=2, retry_backoff_max=0.5)
    try:
        # 1. no queue bound: every publish is returned, nothing is acknowledged
        await push_orders(redis, keys, pid, range(1, batch + 1))

        async def returned() -> bool:
            return (await row_count(settings, [pid]) == batch
                    and engine.output().count(UNCONFIRMED) >= 2
                    and await pending_count(redis, keys, [pid]) == batch)
        await wait_for(returned, 60, "orders logged, their events returned, none acknowledged")
        assert await tap.ready() == 0
        await tap.bind()
        await wait_for(lambda: all_done(settings, redis, keys, [pid], batch), 60,
                       "returned events published again once a queue is bound")

        # 2. only a full queue bound: what does not fit is nacked and retried
        await tap.unbind()
        await full.bind()
        retries = engine.output().count(UNCONFIRMED)
        await push_orders(redis, keys, pid, range(batch + 1, 2 * batch + 1),
                          first_slot=batch + 1)

        async def nacked() -> bool:
            return (await row_count(settings, [pid]) == 2 * batch
                    and engine.output().count(UNCONFIRMED) >= retries + 2
                    and await full.ready() == 50
                    and await pending_count(redis, keys, [pid]) == batch - 50)
        await wait_for(nacked, 60, "the queue full, the rest nacked and held")
        await full.consume()  # room again: the retries get in
        await wait_for(lambda: all_done(settings, redis, keys, [pid], 2 * batch), 60,
                       "nacked events published again once the queue has room")

        async def drained() -> bool:
            return len(full.events) >= batch and await full.ready() == 0
        await wait_for(drained, 30, "the full queue's events consumed")
        await tap.consume()

        async def tapped() -> bool:
            return len(tap.events) >= batch and await tap.ready() == 0
        await wait_for(tapped, 30, "the tap's events consumed")
    finally:
        engine.stop()
        await channel.queue_bind(QUEUE_CREATED, EXCHANGE, routing_key=RK_CREATED)
        await tap.delete()
        await full.delete()
        await conn.close()
    assert "worker 0 exited" not in engine.output() and "worker 1 exited" not in \
        engine.output(), "a returned or nacked event made a worker exit"
    rows = await log_rows(settings, [pid])
    first = {(r["product_id"], r["stream_id"]) for r in rows if r["user_id"] <= batch}
    assert_exactly_one_event_each(
        [r for r in rows if (r["product_id"], r["stream_id"]) in first], tap.events, batch)
    assert_exactly_one_event_each(
        [r for r in rows if (r["product_id"], r["stream_id"]) not in first], full.events,
        batch)
