"""One queue consumed in batches: consume -> wake -> flush -> ack, reconnecting on outages.

Both ends of the closed loop read the bus this way (the engine's status consumer,
the reference Resource Domain): deliveries gather in an inbox, a wake-up lets a
burst gather for a moment, the owner's `handle` settles the whole batch in one
database round trip, and acknowledges what it settled. A delivery is never acked
before its owner says so: a crash or a lost connection leaves it with the broker,
which delivers it again.

Every delivery is checked for its sender first: only messages whose user-id is
`trusted` (the one component allowed to send on this queue) reach `handle`;
the others go to `untrusted`, which dead-letters them. The broker checks user-id
against the publisher's login, so it cannot be forged by someone else's user.

Delivery tags belong to one channel: after a reconnect every delivery held from
the old channel is void, so the inbox is dropped and the owner told (`on_reset`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq

from engine import backoff
from engine.amqp.logins import login
from engine.config import Settings
from engine.connections import RETRYABLE, connect_amqp

log = logging.getLogger("seckill.amqp")

# How long a wake-up waits for the rest of a burst before it flushes.
GATHER_S = 0.02
# How often an idle consumer flushes anyway (what the owner held for later is retried).
IDLE_S = 0.2


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as the owner needs it: its tag to ack, its body, and who sent it.

    `user_id` is the AMQP user-id property, which the broker checks against the
    publisher's login (a message naming another user is refused), so it tells a
    consumer which component sent the message ('' when the publisher set none).
    """

    tag: int
    body: bytes
    user_id: str = ""
    message_type: str = ""
    headers: dict[str, Any] | None = None  # the headers table: a sampled order's trace


def delivery_of(message: Any) -> Delivery:
    props = message.header.properties
    return Delivery(message.delivery.delivery_tag, message.body, props.user_id or "",
                    props.message_type or "", props.headers)


Handler = Callable[[list[Delivery]], Awaitable[None]]


class BatchingConsumer:
    """Consumes `queue` as `component`'s user and hands each gathered batch to `handle`.

    `handle` is called after every wake-up and at least every `IDLE_S`, with an
    empty batch too: an owner that held deliveries back retries them then.
    """

    def __init__(self, settings: Settings, queue: str, *, component: str, trusted: str,
                 prefetch: int, batch_size: int, handle: Handler, untrusted: Handler,
                 on_reset: Callable[[], None] | None = None, name: str = "consumer") -> None:
        self.settings = settings
        self.queue = queue
        self.component = component
        self.trusted = trusted
        self._untrusted = untrusted
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.name = name
        self._handle = handle
        self._on_reset = on_reset
        self._inbox: list[Delivery] = []
        self._unacked: set[int] = set()  # tags of this channel not acknowledged yet
        self._wake = asyncio.Event()
        self._channel: Any = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set; reconnect with backoff on any outage."""
        failures = 0
        while not stopping.is_set():
            try:
                await self._session(stopping)
                failures = 0
            except RETRYABLE as exc:
                failures += 1
                delay = backoff.delay(failures, self.settings.retry_backoff_max)
                log.warning("%s: %s; retrying in %.1fs", self.name, exc, delay,
                            extra={"event": "consumer_retry", "queue": self.queue})
                self._reset()  # unacknowledged: the broker delivers them again
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass

    def _reset(self) -> None:
        self._inbox.clear()
        self._unacked.clear()
        if self._on_reset is not None:
            self._on_reset()

    async def _session(self, stopping: asyncio.Event) -> None:
        url = login(self.settings, self.component).url
        conn = await connect_amqp(self.settings.replace(amqp_url=url))
        try:
            channel = await conn.channel()
            # A new channel starts its tags afresh, and before the first delivery can
            # arrive (aiormq runs deliveries before ConsumeOk returns).
            self._reset()
            self._channel = channel
            await channel.basic_qos(prefetch_count=self.prefetch)
            # The broker cancels the consumer when the queue is deleted (an operator, a
            # re-declare by `seckill migrate`): the channel stays open but nothing comes
            # any more. A new session consumes again (retried until the queue is back).
            cancelled = asyncio.Event()
            channel.on_consumer_cancel_callbacks.add(lambda _frame: cancelled.set())
            await channel.basic_consume(self.queue, self._on_message)
            log.info("%s consuming %s", self.name, self.queue,
                     extra={"event": "consumer_started", "queue": self.queue})
            while not stopping.is_set():
                if conn.is_closed or channel.is_closed:
                    raise aiormq.exceptions.ChannelInvalidStateError(
                        f"{self.name}: channel closed")
                if cancelled.is_set():
                    raise aiormq.exceptions.ChannelInvalidStateError(
                        f"the broker cancelled the consumer of {self.queue} (queue deleted?)")
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_S)
                except TimeoutError:
                    pass
                self._wake.clear()
                await asyncio.sleep(GATHER_S)  # let a burst gather into one batch
                await self.flush()
        finally:
            self._channel = None
            await asyncio.shield(conn.close())

    async def _on_message(self, message: Any) -> None:
        delivery = delivery_of(message)
        self._inbox.append(delivery)
        self._unacked.add(delivery.tag)
        if len(self._inbox) == 1 or len(self._inbox) >= self.batch_size:
            self._wake.set()

    async def flush(self) -> None:
        """Hand what arrived to the owner (also nothing: it may hold some for later), what
        someone else than the trusted sender sent to `untrusted`."""
        batch, self._inbox = self._inbox, []
        foreign = [d for d in batch if d.user_id != self.trusted]
        if foreign:
            await self._untrusted(foreign)
            batch = [d for d in batch if d.user_id == self.trusted]
        await self._handle(batch)

    async def ack(self, tags: set[int] | list[int]) -> None:
        """One multiple-ack for the oldest run of settled deliveries, single acks after it.

        Without a channel (never consumed, or lost) there is nothing to ack: the broker
        delivers those messages again.
        """
        channel, tags = self._channel, set(tags)
        if channel is None or not tags:
            return
        run_end = None
        for tag in sorted(self._unacked):
            if tag not in tags:
                break
            run_end = tag
        if run_end is not None:
            await channel.basic_ack(run_end, multiple=True)
        for tag in sorted(t for t in tags if run_end is None or t > run_end):
            await channel.basic_ack(tag)
        self._unacked -= {t for t in self._unacked if run_end is not None and t <= run_end}
        self._unacked -= tags
