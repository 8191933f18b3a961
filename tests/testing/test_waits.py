"""Waits against a deadline: they return as soon as the condition holds, and fail
naming what they waited for when it never does."""

from __future__ import annotations

import time

import pytest

from engine.errors import WaitTimedOut
from engine.testing.nodes import LocalNodeFailed
from engine.testing.waits import seconds_until, wait_for, wait_until


def countdown(n: int) -> list[int]:
    """A condition that holds on the n-th check (the list counts the checks)."""
    return [n]


async def test_wait_for_returns_once_the_check_holds():
    left = countdown(3)

    async def ready() -> bool:
        left[0] -= 1
        return left[0] <= 0

    started = time.monotonic()
    await wait_for(ready, 10, "the third check", interval=0.01)
    assert left == [0] and time.monotonic() - started < 5


async def test_wait_for_names_what_never_came():
    async def never() -> bool:
        return False

    with pytest.raises(WaitTimedOut, match=r"timed out after 0.1s waiting for the moon"):
        await wait_for(never, 0.1, "the moon", interval=0.02)


async def test_wait_for_raises_the_callers_own_error():
    async def never() -> bool:
        return False

    with pytest.raises(LocalNodeFailed, match="a node"):
        await wait_for(never, 0.05, "a node", interval=0.01, error=LocalNodeFailed)


def test_wait_until_blocks_until_the_check_holds_or_the_deadline():
    left = countdown(2)

    def ready() -> bool:
        left[0] -= 1
        return left[0] <= 0

    wait_until(ready, 10, "the second check", interval=0.01)
    assert left == [0]
    with pytest.raises(WaitTimedOut, match="waiting for nothing"):
        wait_until(lambda: False, 0.05, "nothing", interval=0.01)


async def test_recovery_is_timed_from_the_fault_end_and_none_if_never_drained():
    checks = iter([False, False, True])

    async def drains() -> bool:
        return next(checks)

    fault_end = time.monotonic()
    seconds = await seconds_until(fault_end, drains, timeout=30, interval=0.05)
    assert seconds is not None and seconds >= 0.1

    async def never() -> bool:
        return False

    assert await seconds_until(time.monotonic(), never, timeout=0.2, interval=0.05) is None
