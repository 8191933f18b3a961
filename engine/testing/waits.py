"""Waiting for a condition against a deadline, never for a fixed time.

A fixed sleep is either too short on a busy machine or wasted on an idle one; a poll
with a deadline returns as soon as the condition holds and fails, naming what it
waited for, when it never does. `wait_for` is the asyncio form (the check is a
coroutine function), `wait_until` the blocking one (a server starting), and
`seconds_until` times a recovery instead of failing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from engine.errors import WaitTimedOut


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                   interval: float = 0.2, *,
                   error: type[Exception] = WaitTimedOut) -> None:
    """Poll `await check()` until true; `error` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05, *, error: type[Exception] = WaitTimedOut) -> None:
    """Poll `check()` until true, blocking; `error` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def seconds_until(since: float, check: Callable[[], Awaitable[bool]], timeout: float,
                        interval: float = 0.2) -> float | None:
    """Seconds from `since` (time.monotonic()) until `await check()` holds; None if it
    did not within `timeout` seconds from now (a recovery that never came)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return max(0.0, time.monotonic() - since)
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval)
