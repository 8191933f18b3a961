"""Publish a batch's events with publisher confirms, many in flight.

A batch's publishes are framed into one write and registered in aiormq's
confirmation map under the channel lock, exactly as `basic_publish` does one
at a time; then we wait for all confirms at once. One deadline per batch
covers everything that can wait on the broker: opening the channel, taking
the channel lock, queueing the frames and the confirms. The
per-message cost of going through `basic_publish` (a lock, a timeout scope,
a queue put and a drain per message) was most of the engine's CPU. Where the
channel does not look like the aiormq we know, the public path is used.

Every message carries the component's broker user in its user-id property (the
broker refuses it from anyone else), which is what its consumers trust.

`after_send` is called once a batch's frames are queued and before its confirms
are looked at: the engine's fault points kill a worker there (the publisher
itself knows nothing of them, so the Resource Domain can use it too).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from engine.amqp.framing import PERSISTENT, Framer, shortstr, table
from engine.amqp.logins import ENGINE, login, user_of
from engine.amqp.topology import CONTENT_TYPE, EXCHANGE
from engine.config import Settings, mask_url
from engine.connections import connect_amqp
from engine.errors import PublishFailed, ServiceUnavailable

log = logging.getLogger("seckill.publisher")

# Outcomes of one publish, as counted in metrics.
CONFIRMED, RETURNED, NACKED, TIMEOUT, LOST = "confirmed", "returned", "nacked", "timeout", "lost"


@dataclass(frozen=True, slots=True)
class Message:
    body: bytes
    message_id: str
    type_name: str | None = None  # None: the publisher's own event type
    headers: Mapping[str, str] | None = None  # a sampled order's trace context


class ConfirmPublisher:
    """One connection and one confirm channel; reconnects on demand."""

    def __init__(self, settings: Settings, routing_key: str, type_name: str,
                 *, component: str = ENGINE, fast: bool = True,
                 after_send: Callable[[], Awaitable[None]] | None = None) -> None:
        self._settings = settings
        self._component = component
        self.user = user_of(settings, component)
        self._after_send = after_send
        self._routing_key = routing_key
        self._type_name = type_name
        self._fast_wanted = fast
        self._conn: Any = None
        self._channel: Any = None
        self._framer: Framer | None = None
        self._max_body = 0
        self._connecting = asyncio.Lock()  # batches share us: one reconnect at a time

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and open a confirm channel, the channel within `timeout` (default: the
        publish timeout): a broker that accepts TCP but never answers must not hang us."""
        await self.close()
        conn = await connect_amqp(self._settings.replace(
            amqp_url=login(self._settings, self._component).url))
        try:
            channel = await asyncio.wait_for(
                conn.channel(publisher_confirms=True, on_return_raises=True),
                timeout or self._settings.publish_timeout)
        except TimeoutError as exc:
            await _close_quietly(conn)
            raise ServiceUnavailable(f"RabbitMQ at {mask_url(self._settings.amqp_url)}: "
                                     "the confirm channel did not open in time") from exc
        except BaseException:
            await _close_quietly(conn)
            raise
        fast = self._fast_wanted and _fast_path_supported(channel)
        if fast:
            _install_in_order_confirms(channel)
        # set together, once complete: a batch never sees half a connection
        self._framer = Framer.create(channel.number, EXCHANGE, self._routing_key,
                                     self._type_name, user_id=self.user) if fast else None
        self._max_body = conn.connection_tune.frame_max - 8
        self._conn, self._channel = conn, channel

    @property
    def connected(self) -> bool:
        return (self._channel is not None and not self._channel.is_closed
                and self._conn is not None and not self._conn.is_closed)

    async def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            await _close_quietly(conn)

    async def publish(self, messages: Sequence[Message], timeout: float) -> list[str]:
        """Publish all; return each message's outcome (CONFIRMED or why not)."""
        if not messages:
            return []
        if all(m.type_name is None for m in messages):
            headers = {i: m.headers for i, m in enumerate(messages) if m.headers}
            return await self.publish_bodies([m.body for m in messages],
                                             [m.message_id for m in messages], timeout,
                                             headers or None)
        return await self._publish(_Batch(messages), timeout)

    async def publish_bodies(self, bodies: Sequence[bytes], message_ids: Sequence[str],
                             timeout: float,
                             headers: Mapping[int, Mapping[str, str]] | None = None
                             ) -> list[str]:
        """`publish` of messages of the publisher's own event type, given as two lists
        (a batch's bodies and IDs, without an object per message); `headers`: the
        headers tables of the few that have one (a sampled order's), by index."""
        if not bodies:
            return []
        return await self._publish(_Batch.of(bodies, message_ids, headers), timeout)

    async def _publish(self, batch: _Batch, timeout: float) -> list[str]:
        if not self.connected:
            async with self._connecting:
                if not self.connected:
                    await self.connect(timeout)
        channel, framer = self._channel, self._framer
        if channel is None:  # another batch dropped it while we waited
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        now = dt.datetime.now(dt.UTC)
        if framer is not None and max(map(len, batch.bodies)) <= self._max_body:
            deadline = asyncio.get_running_loop().time() + timeout
            return await self._publish_framed(channel, framer, batch, int(now.timestamp()),
                                              deadline)
        futures: list[asyncio.Future] = [
            asyncio.ensure_future(self._send_one(channel, m, now)) for m in batch.messages()]
        if self._after_send is not None:
            await self._after_send()
        return await _outcomes(futures, timeout)

    async def _publish_framed(self, channel: Any, framer: Framer, messages: _Batch,
                              ts: int, deadline: float) -> list[str]:
        loop = asyncio.get_running_loop()
        batch = _ConfirmBatch(len(messages.bodies), loop)
        first, last = await self._send_framed(channel, framer, messages, ts, batch, deadline)
        if self._after_send is not None:
            await self._after_send()
        closing = channel.closing
        try:
            if not batch.done.done():
                await asyncio.wait((batch.done, closing),
                                   timeout=max(0.0, deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        _forget_batch(channel, messages.ids, first, last, returned=RETURNED in batch.outcomes)
        if not batch.done.done():  # timed out or the channel closed under us
            lost = LOST if channel.is_closed else TIMEOUT
            return [lost if o is None else o for o in batch.outcomes]
        return batch.outcomes  # type: ignore[return-value]

    async def _send_framed(self, channel: Any, framer: Framer, messages: _Batch,
                           ts: int, batch: _ConfirmBatch, deadline: float) -> tuple[int, int]:
        """Frame and queue every publish under the channel lock, by the deadline.

        Past the deadline the channel is dropped: tags may be taken and slots
        registered for frames that never left, so its bookkeeping is no longer true.
        """
        try:
            async with asyncio.timeout_at(deadline):
                return await _write_framed(channel, framer, messages, ts, batch)
        except TimeoutError as exc:
            if self._channel is channel:  # not a newer one another batch opened
                await self.close()
            raise PublishFailed(f"{len(messages.bodies)} events: the channel stayed busy past "
                                "the publish timeout") from exc

    async def _send_one(self, channel: Any, message: Message, now: dt.datetime) -> Any:
        props = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, message_id=message.message_id,
            timestamp=now, message_type=message.type_name or self._type_name,
            user_id=self.user, headers=dict(message.headers) if message.headers else None)
        return await channel.basic_publish(
            message.body, exchange=EXCHANGE, routing_key=self._routing_key,
            properties=props, mandatory=True, wait=False)


async def _write_framed(channel: Any, framer: Framer, messages: _Batch, ts: int,
                        batch: _ConfirmBatch) -> tuple[int, int]:
    payload = _frames(framer, messages, ts)
    async with channel.lock:
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        first = tag = channel.delivery_tag
        confirmations, by_id = channel.confirmations, channel.message_id_delivery_tag
        for index, message_id in enumerate(messages.ids):
            tag += 1
            confirmations[tag] = _PendingConfirm(batch, index)
            by_id[message_id] = tag
        channel.delivery_tag = tag
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
    return first + 1, tag


def _frames(framer: Framer, messages: _Batch, ts: int) -> bytes:
    """Every publish of a batch as one write: the framer's batch encoding when every one
    is the publisher's own event type (a sampled order's headers in their place),
    one by one otherwise."""
    headers = messages.headers or {}
    if messages.type_names is None:
        return framer.publish_many(messages.bodies, messages.ids, ts,
                                   {i: table(h) for i, h in headers.items()} or None)
    return b"".join(
        framer.publish(body, mid, ts, shortstr(kind) if kind else None,
                       table(headers[i]) if i in headers else b"")
        for i, (body, mid, kind) in enumerate(zip(messages.bodies, messages.ids,
                                                  messages.type_names, strict=True)))


class _Batch:
    """A batch's messages as parallel lists: bodies, message IDs, event types (None when
    every one is the publisher's own), and the headers of those that have some."""

    __slots__ = ("bodies", "ids", "type_names", "headers")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.bodies = [m.body for m in messages]
        self.ids = [m.message_id for m in messages]
        self.type_names: list[str | None] | None = [m.type_name for m in messages]
        self.headers: Mapping[int, Mapping[str, str]] | None = {
            i: m.headers for i, m in enumerate(messages) if m.headers} or None

    @classmethod
    def of(cls, bodies: Sequence[bytes], ids: Sequence[str],
           headers: Mapping[int, Mapping[str, str]] | None = None) -> _Batch:
        if len(bodies) != len(ids):
            raise ValueError(f"{len(bodies)} bodies and {len(ids)} message IDs")
        batch = cls.__new__(cls)
        batch.bodies, batch.ids, batch.type_names = list(bodies), list(ids), None
        batch.headers = headers
        return batch

    def messages(self) -> list[Message]:
        kinds = self.type_names or [None] * len(self.bodies)
        headers = self.headers or {}
        return [Message(b, i, k, headers.get(n)) for n, (b, i, k) in
                enumerate(zip(self.bodies, self.ids, kinds, strict=True))]


def _fast_path_supported(channel: Any) -> bool:
    needed = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag",
              "write_queue", "create_future", "number")
    return all(hasattr(channel, name) for name in needed) and channel.publisher_confirms


class _ConfirmBatch:
    """Outcomes of one framed batch, and a future resolved when all are known."""

    __slots__ = ("outcomes", "left", "done")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.outcomes: list[str | None] = [None] * size
        self.left = size
        self.done = loop.create_future()

    def settle(self, index: int, outcome: str) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.left -= 1
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)


class _PendingConfirm:
    """Stands in for aiormq's per-publish future in its confirmation map.

    aiormq only calls done(), cancelled(), set_result(), set_exception() and
    cancel() on what it finds there; it answers those by settling its
    place in the batch, without a tracked future and its callbacks per message.
    """

    __slots__ = ("batch", "index")

    def __init__(self, batch: _ConfirmBatch, index: int) -> None:
        self.batch = batch
        self.index = index

    def done(self) -> bool:
        return self.batch.outcomes[self.index] is not None

    def cancelled(self) -> bool:
        return False

    def set_result(self, frame: Any) -> None:
        nack = isinstance(frame, aiormq.spec.Basic.Nack)
        self.batch.settle(self.index, NACKED if nack else CONFIRMED)

    def set_exception(self, exc: BaseException) -> None:
        self.batch.settle(self.index, _failure(exc))

    def cancel(self) -> None:
        self.batch.settle(self.index, LOST)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.PublishError):
        return RETURNED
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return NACKED
    return LOST


def _install_in_order_confirms(channel: Any) -> None:
    """Settle a multiple-ack by walking the confirmation map from its oldest tag.

    aiormq schedules a callback per covered tag and scans the whole map for
    every ack frame; tags are inserted in increasing order, so the covered
    ones are exactly a prefix of the map. An ack of one of our publishes
    settles its place in its batch right here (what aiormq's `_confirm_delivery`
    and `_PendingConfirm.set_result` would do, without two calls per event);
    anything else (a nack, a returned publish's marker, someone else's
    future) goes the way aiormq handles it.
    """
    confirmations = channel.confirmations
    confirm = channel._confirm_delivery  # noqa: SLF001 - see the module docstring
    ack = aiormq.spec.Basic.Ack

    async def on_confirm(frame: Any) -> None:
        if not getattr(frame, "multiple", False):
            confirm(frame.delivery_tag, frame)
            return
        last, acked = frame.delivery_tag, isinstance(frame, ack)
        while confirmations:
            tag = next(iter(confirmations))
            if tag > last:
                break
            pending = confirmations[tag]
            if acked and type(pending) is _PendingConfirm:
                del confirmations[tag]
                pending.batch.settle(pending.index, CONFIRMED)
            else:
                confirm(tag, frame)

    channel._on_confirm_frame = on_confirm  # noqa: SLF001


def _forget_batch(channel: Any, message_ids: Sequence[str], first: int, last: int,
                  *, returned: bool) -> None:
    """Drop the batch's message IDs (and markers of returned publishes) from aiormq's maps."""
    by_id = channel.message_id_delivery_tag
    for tag, message_id in enumerate(message_ids, first):
        if by_id.get(message_id) == tag:
            del by_id[message_id]
    if returned:  # aiormq re-inserts a marker for a returned tag at the end of the map
        for tag in [t for t in channel.confirmations if first <= t <= last
                    and not isinstance(channel.confirmations[t], _PendingConfirm)]:
            del channel.confirmations[tag]


async def _outcomes(futures: list[asyncio.Future], timeout: float) -> list[str]:
    await _all_done(futures, timeout)
    return [_outcome(f) for f in futures]


async def _all_done(futures: list[asyncio.Future], timeout: float) -> None:
    """Wait until every future is done or the timeout passes.

    One countdown instead of asyncio.wait's per-future bookkeeping: a batch
    holds hundreds of confirmations.
    """
    waiting = [f for f in futures if not f.done()]
    if not waiting:
        return
    done = asyncio.get_running_loop().create_future()
    left = len(waiting)

    def count_down(_: asyncio.Future) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not done.done():
            done.set_result(None)

    for future in waiting:
        future.add_done_callback(count_down)
    try:
        async with asyncio.timeout(timeout):
            await done
    except TimeoutError:
        pass


def _outcome(future: asyncio.Future) -> str:
    if not future.done():
        future.cancel()
        return TIMEOUT
    if future.cancelled():
        return LOST
    exc = future.exception()
    if exc is None:
        result = future.result()
        return NACKED if isinstance(result, aiormq.spec.Basic.Nack) else CONFIRMED
    if isinstance(exc, aiormq.exceptions.PublishError):
        return RETURNED
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return NACKED
    return LOST


async def _close_quietly(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:  # noqa: BLE001 - closing a broken connection may fail any way
        pass
