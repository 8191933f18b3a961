"""The coalesced purchases on a single Redis: one connection, the calls pipelined on it.

A busy BFF sends the purchase attempts of one loop turn together
(engine.gate.redis_gate `Gate(coalesce=True)`). Through redis-py each such batch costs
a pool checkout, a task for the send's timeout, and a timeout context, an encoder pass
and a parser call per reply; here a batch is one write and its replies one parser
feed. The BFF's batches are small (a handful of calls, where a client calling the gate
in a loop sends thirty-two at once), so the fixed cost of a batch is most of what a
purchase costs the BFF above the gate itself: that is the cost this module removes
(`python -m bench.gatebatch` compares the two).

One connection per process carries every batch: the EVALSHAs of a turn packed by
hiredis and written at once, the replies parsed by hiredis as they arrive and handed
out in order (Redis answers a connection's commands in the order sent). While a batch
is in flight the next one waits for its replies, so the calls of a busy server gather
into fewer, larger writes. One timer, not one per call, bounds the wait: a reply
later than the socket timeout drops the connection and fails every call in flight, as
a lost connection does. A call in flight then may have run; it fails with
ServiceUnavailable, like any call whose reply never came. NOSCRIPT (a SCRIPT FLUSH, a
restarted Redis) loads the script and sends those calls again.

Used for a single Redis without WAIT; a cluster or `gate_wait_replicas` goes through
RoutedScript (engine.gate.routed), which routes per master and waits on the very
connection that wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine import backoff
from engine.errors import ServiceUnavailable, one_line

ROUNDS = 5  # sends of one call after NOSCRIPT before it fails
RECONNECT_MAX = 2.0  # seconds between two connection attempts at most


@dataclass(slots=True)
class _Call:
    command: bytes
    future: asyncio.Future[tuple[object, None]]
    rounds: int = 1
    sent: float = 0.0  # the loop's time when written


class ScriptPipe:
    """A Lua script's calls, each loop turn's sent together down one connection.

    A call resolves to `(reply, None)`, as RoutedScript's without WAIT; an error reply
    fails it with redis-py's ResponseError, a lost or silent connection with
    ServiceUnavailable.
    """

    wait = None  # (RoutedScript's WAIT: never here)

    def __init__(self, redis: Redis, source: str) -> None:
        """`redis`: the client whose connection settings (address, credentials, TLS,
        socket timeout) the pipe's own connection takes, and which loads the script."""
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.timeout = float(redis.connection_pool.connection_kwargs.get("socket_timeout")
                             or 5.0)
        self._queue: list[_Call] = []  # not sent yet
        self._inflight: deque[_Call] = deque()  # sent, in the order sent
        self._transport: asyncio.Transport | None = None
        self._conn: Any = None  # redis-py's, kept: collected, it would close the socket
        self._opening: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, keys: list[str], args: list[str | int]
                 ) -> asyncio.Future[tuple[object, None]]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[object, None]] = loop.create_future()
        command = hiredis.pack_command(  # (its stub types a 1-tuple)
            ("EVALSHA", self.sha, len(keys), *keys, *args))  # type: ignore[arg-type]
        self._queue.append(_Call(command, future))
        if len(self._queue) == 1:  # the first of this turn: send after the others queued
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Send what is queued, unless a batch is in flight (its replies send it)."""
        if self._inflight or not self._queue:
            return
        if self._transport is not None:
            batch, self._queue = self._queue, []
            self._send(self._transport, batch)
        elif self._opening is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # the last attempt failed: no new one before its backoff
                self._fail_queue(ServiceUnavailable(
                    f"Redis: unreachable, next attempt in {wait:.1f}s"))
            else:
                self._opening = self._spawn(self._open())

    def _send(self, transport: asyncio.Transport, batch: list[_Call]) -> None:
        assert self._loop is not None
        transport.write(b"".join([call.command for call in batch]))
        now = self._loop.time()
        for call in batch:
            call.sent = now
        self._inflight.extend(batch)
        if self._timer is None:
            self._timer = self._loop.call_at(now + self.timeout, self._check_late)

    async def _open(self) -> None:
        """Connect: redis-py's connection does the handshake (AUTH, SELECT, TLS), then
        its transport is handed to a protocol of ours; then send what waited."""
        conn = self.redis.connection_pool.make_connection()
        try:
            await asyncio.wait_for(conn.connect(), self.timeout)
            transport = conn._writer.transport  # noqa: SLF001 - see the docstring
        except BaseException as exc:  # noqa: BLE001 - the waiting calls get it
            await conn.disconnect(nowait=True)
            if isinstance(exc, asyncio.CancelledError):
                self._opening = None
                raise
            self._failures += 1
            self._retry_at = time.monotonic() + backoff.delay(self._failures, RECONNECT_MAX)
            self._opening = None
            self._fail_queue(ServiceUnavailable(f"Redis: {one_line(exc)}"))
            return
        self._failures = 0
        transport.set_protocol(_Replies(self, transport))
        self._transport, self._conn, self._opening = transport, conn, None
        self._flush()

    def _received(self, parser: hiredis.Reader, data: bytes) -> None:
        """Replies arrived: each to the oldest call in flight; then the next batch."""
        parser.feed(data)
        inflight = self._inflight
        try:
            while (reply := parser.gets()) is not False:
                call = inflight.popleft()
                if isinstance(reply, ResponseError):
                    if str(reply).startswith("NOSCRIPT"):
                        self._reload(call)
                    elif not call.future.done():
                        call.future.set_exception(reply)
                elif not call.future.done():
                    call.future.set_result((reply, None))
        except (IndexError, hiredis.ProtocolError) as exc:  # a reply for no call: broken
            self._drop(ServiceUnavailable(f"Redis: bad reply stream ({one_line(exc)})"))
            return
        if not inflight and self._queue:
            self._flush()

    def _reload(self, call: _Call) -> None:
        """NOSCRIPT: load the script, then send the call again (ROUNDS times at most)."""
        if call.rounds >= ROUNDS:
            _fail([call], ServiceUnavailable(f"Redis: NOSCRIPT after {ROUNDS} loads"))
            return
        call.rounds += 1

        async def reload() -> None:
            try:
                await asyncio.wait_for(self.redis.script_load(self.source), self.timeout)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                _fail([call], ServiceUnavailable(f"Redis: {one_line(exc)}"))
                raise
            self._queue.append(call)
            self._flush()

        self._spawn(reload())

    def _check_late(self) -> None:
        """The timer: the oldest call in flight past the timeout drops the connection."""
        self._timer = None
        if not self._inflight or self._loop is None:
            return
        sent = self._inflight[0].sent
        if self._loop.time() - sent >= self.timeout:
            self._drop(ServiceUnavailable(f"Redis: no reply within {self.timeout:g}s"))
        else:
            self._timer = self._loop.call_at(sent + self.timeout, self._check_late)

    def _lost(self, transport: asyncio.Transport, exc: BaseException | None) -> None:
        if transport is self._transport:
            why = "Redis closed the connection" if exc is None else one_line(exc)
            self._drop(ServiceUnavailable(f"Redis: {why}"))

    def _drop(self, why: ServiceUnavailable) -> None:
        """The connection is gone: every call in flight fails, the queue reconnects."""
        transport, self._transport, self._conn = self._transport, None, None
        inflight, self._inflight = self._inflight, deque()
        _fail(inflight, why)
        if transport is not None:
            transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _fail_queue(self, why: BaseException) -> None:
        batch, self._queue = self._queue, []
        _fail(batch, why)

    async def close(self) -> None:
        """Fail what is queued or in flight and close the connection."""
        for task in list(self._tasks):
            task.cancel()
        self._fail_queue(ServiceUnavailable("Redis: the gate is closing"))
        self._drop(ServiceUnavailable("Redis: the gate is closing"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _Replies(asyncio.Protocol):
    """The pipe's end of its connection: bytes in, replies out, in order."""

    def __init__(self, pipe: ScriptPipe, transport: asyncio.Transport) -> None:
        self.pipe = pipe
        self.transport = transport
        self.parser = hiredis.Reader(replyError=ResponseError)

    def data_received(self, data: bytes) -> None:
        self.pipe._received(self.parser, data)  # noqa: SLF001 - the pipe's own half

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe._lost(self.transport, exc)  # noqa: SLF001


def _fail(calls: Iterable[_Call], exc: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)
