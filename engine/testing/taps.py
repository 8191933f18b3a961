"""A tap: a queue of our own bound to the exchange, keeping every event the engine
published while it was bound, to be read after the run.

Durable, so it survives a broker restart in the middle of a run; deleted when the
run is done (a tap left bound would take every later run's events). Three ways to
read it: `collect` (consume and acknowledge until so many events came),
`collect_orders(tap, n)` (until so many distinct orders have an event: after an
outage an order's event may come more than once, with the same instance ID) and `peek`
(read without acknowledging: the broker puts them back, so reading twice gives the
same answer).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiormq

from engine.amqp.topology import EXCHANGE, RK_CREATED
from engine.pb import event_pb2
from engine.testing.waits import wait_for

TIMEOUT = 30.0  # seconds any one call to the broker may take


class EventTap:
    """A tap on `routing_key` (instance.created), named `queue` or `<prefix>-<random>`.

    `events` holds what `collect` consumed so far: (message properties, Event).
    """

    def __init__(self, amqp_url: str, routing_key: str = RK_CREATED, *,
                 queue: str | None = None, prefix: str = "test-tap",
                 expires_ms: int | None = None) -> None:
        self.url = amqp_url
        self.routing_key = routing_key
        self.queue = queue or f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.expires_ms = expires_ms  # the broker deletes a tap nobody used for this long
        self.events: list[tuple[Any, Any]] = []

    async def _connect(self) -> aiormq.abc.AbstractConnection:
        return await asyncio.wait_for(aiormq.connect(self.url), TIMEOUT)

    async def declare(self) -> EventTap:
        """The queue declared and bound: from now on it keeps every event."""
        arguments: dict[str, Any] | None = (
            {"x-expires": self.expires_ms} if self.expires_ms else None)
        conn = await self._connect()
        try:
            channel = await conn.channel()
            await channel.queue_declare(self.queue, durable=True, arguments=arguments)
            await channel.queue_bind(self.queue, EXCHANGE, routing_key=self.routing_key)
        finally:
            await conn.close()
        return self

    async def delete(self) -> None:
        """The queue gone; nothing to do if the broker is (a private node destroyed
        before: its queues went with it)."""
        try:
            conn = await self._connect()
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError):
            return
        try:
            channel = await conn.channel()
            await channel.queue_delete(self.queue)
        finally:
            await conn.close()

    async def __aenter__(self) -> EventTap:
        return await self.declare()

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def collect(self, expected: int, timeout: float = 60) -> list[Any]:
        """Consume until `expected` events arrived in all (or the timeout), then whatever
        else is queued already; returns every event consumed so far."""
        conn = await self._connect()
        try:
            channel = await conn.channel()
            await channel.basic_qos(prefetch_count=1000)
            done = asyncio.Event()
            started = handled = 0

            async def on_message(message: Any) -> None:
                nonlocal started, handled
                started += 1
                event = event_pb2.Event()
                event.ParseFromString(message.body)
                self.events.append((message.header.properties, event))
                await channel.basic_ack(message.delivery.delivery_tag)
                handled += 1
                if len(self.events) >= expected:
                    done.set()

            async def drained() -> bool:
                # The broker's answer comes after every delivery it sent us before, and
                # each delivery's callback is started before we resume.
                ready = (await channel.queue_declare(self.queue, passive=True)).message_count
                return ready == 0 and handled == started

            if len(self.events) < expected:
                await channel.basic_consume(self.queue, on_message)
                try:
                    await asyncio.wait_for(done.wait(), timeout)
                except TimeoutError:
                    pass
            if done.is_set():
                # and whatever else is queued already (an order's event again)
                await wait_for(drained, 30, "the tap queue drained", interval=0.02)
        finally:
            await conn.close()
        return [e for _, e in self.events]

    async def peek(self, idle: float = 5.0) -> list[Any]:
        """Every event in the queue, read without acknowledging (none new for `idle` s):
        the broker puts them back when the connection closes."""
        conn = await self._connect()
        seen: list[Any] = []
        try:
            channel = await conn.channel()
            quiet = 0.0
            while quiet < idle:
                message = await channel.basic_get(self.queue, no_ack=False, timeout=TIMEOUT)
                if not message.body and message.delivery_tag is None:
                    await asyncio.sleep(0.1)
                    quiet += 0.1
                    continue
                seen.append(event_pb2.Event.FromString(message.body))
                quiet = 0.0
        finally:
            await conn.close()
        return seen


async def collect_orders(tap: EventTap, orders: int, timeout: float = 60) -> list[Any]:
    """Consume the tap until events of `orders` distinct orders came (or the timeout);
    every event consumed, repeats included. A count of events alone would stop early
    when an order's event came twice, and leave some orders' first events unread."""
    deadline = time.monotonic() + timeout
    while True:
        distinct = len({(e.product_id, e.stream_id) for _, e in tap.events})
        left = deadline - time.monotonic()
        if distinct >= orders or left <= 0:
            return [e for _, e in tap.events]
        await tap.collect(len(tap.events) + orders - distinct, timeout=left)
