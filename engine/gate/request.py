"""One HTTP request as the BFF reads it, from either of Granian's interfaces.

The BFF is served over RSGI, Granian's own interface: a header is one lookup
in Rust, the body one await, the answer one call (ASGI needs a message dict
per step and two awaits to answer, each crossing into Granian's runtime).
The same application stays an ASGI app for any other server. Both kinds of
request offer the few things the BFF reads: method, path, a header by its
lower-case name, the peer's address and the body.

The path is the one the client sent where the server passes it on (ASGI's
`raw_path`), so that `%2F` is never taken for a `/` by the router; Granian's RSGI
scope has only the decoded path, where the two cannot be told apart.

A body's deadline (`bff_body_timeout`) is kept by one timer per process
(BodyDeadlines), not one per request: an `asyncio.timeout` per request arms and
cancels a timer on the hot path, a sweep a few times per deadline costs nothing
per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.errors import InvalidInput

Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyTooLarge(InvalidInput):
    """A request body over the BFF's limit (400)."""


class BodyTimeout(Exception):
    """The client did not send its whole body within bff_body_timeout (408)."""


class RepeatedHeader(InvalidInput):
    """A header that must come once came several times (400): which of two
    Authorization lines counts is exactly what a smuggling proxy and we may disagree
    on."""

    def __init__(self, name: str, count: int) -> None:
        super().__init__(f"{name}: sent {count} times, send it once")


class AsgiRequest:
    __slots__ = ("method", "path", "receive", "scope")

    def __init__(self, scope: dict[str, Any], receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        raw = scope.get("raw_path")
        self.path: str = scope["path"] if raw is None else \
            bytes(raw).decode("latin-1").partition("?")[0]

    def header(self, name: str) -> str | None:
        key = name.encode("latin-1")
        for k, value in self.scope["headers"]:
            if k == key:
                return bytes(value).decode("latin-1")
        return None

    def header_lines(self, name: str) -> list[str]:
        """Every line of a header, in the order received."""
        key = name.encode("latin-1")
        return [bytes(v).decode("latin-1") for k, v in self.scope["headers"] if k == key]

    def single_header(self, name: str) -> str | None:
        """`header(name)`, RepeatedHeader when it came more than once."""
        key = name.encode("latin-1")
        values = [value for k, value in self.scope["headers"] if k == key]
        if len(values) > 1:
            raise RepeatedHeader(name, len(values))
        return bytes(values[0]).decode("latin-1") if values else None

    def peer(self) -> str | None:
        client = self.scope.get("client")
        return str(client[0]) if client else None

    async def body(self, limit: int) -> bytes:
        body = b""
        while True:
            message = await self.receive()
            body += message.get("body", b"")
            if len(body) > limit:
                raise BodyTooLarge(f"body larger than {limit} bytes")
            if not message.get("more_body"):
                return body


class RsgiRequest:
    __slots__ = ("method", "path", "protocol", "scope")

    def __init__(self, scope: Any, protocol: Any) -> None:
        self.scope = scope
        self.protocol = protocol
        self.method: str = scope.method
        self.path: str = scope.path

    def header(self, name: str) -> str | None:
        value = self.scope.headers.get(name)
        return None if value is None else str(value)

    def header_lines(self, name: str) -> list[str]:
        """Every line of a header, in the order received."""
        return [str(v) for v in self.scope.headers.get_all(name)]

    def single_header(self, name: str) -> str | None:
        """`header(name)`, RepeatedHeader when it came more than once."""
        values = self.scope.headers.get_all(name)
        if len(values) > 1:
            raise RepeatedHeader(name, len(values))
        return str(values[0]) if values else None

    def peer(self) -> str | None:
        client = self.scope.client or ""  # "host:port", "[v6]:port" or empty
        host = _PEERS.get(client)
        if host is None:  # a new connection: parsed once, while it is kept alive
            if len(_PEERS) >= PEERS_KEPT:
                _PEERS.clear()
            address, colon, _ = client.rpartition(":")
            host = _PEERS[client] = (address if colon else client).strip("[]")
        return host or None

    def body(self, limit: int) -> Awaitable[bytes]:
        """Granian's own awaitable (no coroutine of ours around it): it bounds the body
        by bff_max_buffer, BodyDeadlines.read by `limit`."""
        return self.protocol()  # type: ignore[no-any-return]


Request = AsgiRequest | RsgiRequest
PEERS_KEPT = 4096  # peer addresses parsed, by Granian's "host:port" (one per connection)
_PEERS: dict[str, str] = {}


class BodyDeadlines:
    """Bodies being read, each cut off `seconds` after it started (BodyTimeout).

    One timer sweeps the reads in flight `TICKS` times per deadline and cancels the
    ones past it, so a deadline fires up to a tick late. Nothing is armed or
    disarmed per request but a dict entry.
    """

    TICKS = 8

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = max(0.01, seconds / self.TICKS)
        self.reading: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        # the worker's one loop: current_task(loop) skips the running-loop lookup, which
        # on Python 3.11 makes a getpid() system call each time
        self.loop: asyncio.AbstractEventLoop | None = None

    async def read(self, request: Request, limit: int) -> bytes:
        """`request`'s whole body, BodyTooLarge past `limit` bytes."""
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self.reading[task] = time.monotonic() + self.seconds
        if self.timer is None:
            self.timer = loop.call_later(self.tick, self._sweep)
        try:
            body = await request.body(limit)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)
            task.uncancel()
            raise BodyTimeout from None
        finally:
            self.reading.pop(task, None)
            self.expired.discard(task)
        if len(body) > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
        return bytes(body)

    def _sweep(self) -> None:
        now = time.monotonic()
        late = [task for task, deadline in self.reading.items() if deadline <= now]
        for task in late:
            del self.reading[task]
            self.expired.add(task)
            task.cancel()
        self.timer = self.loop.call_later(self.tick, self._sweep) \
            if self.reading and self.loop is not None else None
