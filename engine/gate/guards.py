"""What the BFF refuses before doing the work, to keep serving everyone else.

A process that takes on more requests than it can answer in time answers all of
them late; one that refuses the surplus at once (429) keeps answering the rest in
time, and a client told so can come back. The cap wraps the work of a request as
uvicorn's concurrency limit wraps an application: counted while it runs, refused
before it starts once the count is reached. The throttle of failed authentications
keeps one client's bad tokens from buying it the BFF's CPU.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from types import TracebackType

from engine.errors import Overloaded


class InflightCap:
    """At most `cap` requests of this process at work at once (0 = no cap); past it, a
    request is refused at once (Overloaded) rather than queued behind the others.

    A context manager (`with cap: ...`), not a coroutine around the work: entering and
    leaving it is two method calls on the purchase's hot path, no frame of its own.
    """

    __slots__ = ("cap", "count")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    def __enter__(self) -> None:
        if self.cap and self.count >= self.cap:
            raise Overloaded("too many requests in flight, try again")
        self.count += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.count -= 1


class FailureThrottle:
    """Failed authentications per client address: a token bucket each, `rate` per second
    and `burst` at once (rate 0 = no limit).

    A bad token costs the BFF a signature check (an RSA verification: the most CPU any
    request costs it) and its sender nothing, so without a bound one client sending
    garbage outweighs thousands of buyers. `check` before a token is verified refuses
    an address whose failures are used up, at the cost of a dict lookup; `failed`
    after a refusal spends one. Only an address that failed has a bucket, so buyers with
    good tokens never touch this; buckets are kept for the `size` addresses that failed
    last (an OrderedDict: the oldest is evicted in O(1), whatever the flood). An IPv6
    client is counted by its /64, which one subscriber usually has whole.
    """

    __slots__ = ("buckets", "burst", "rate", "size")

    def __init__(self, rate: float, burst: int, size: int = 65_536) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.size = size
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()  # [tokens, at]

    def check(self, address: str | None) -> None:
        """Overloaded when `address` has no failure left to spend right now."""
        if not self.rate or not self.buckets:
            return
        bucket = self.buckets.get(_client_key(address))
        if bucket is None:
            return
        tokens = self._refill(bucket, time.monotonic())
        if tokens < 1:
            raise Overloaded("too many failed authentications from this address; "
                             "try again later", math.ceil((1 - tokens) / self.rate))

    def failed(self, address: str | None) -> None:
        """`address` sent a token that was refused: one failure spent."""
        if not self.rate:
            return
        key, now = _client_key(address), time.monotonic()
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.size:
                self.buckets.popitem(last=False)
            self.buckets[key] = [self.burst - 1.0, now]
            return
        bucket[0] = self._refill(bucket, now) - 1.0
        bucket[1] = now
        self.buckets.move_to_end(key)

    def _refill(self, bucket: list[float], now: float) -> float:
        return min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)


KEY_CHARS = 64  # of an address kept as a bucket's key at most


def _client_key(address: str | None) -> str:
    """An IPv4 address as it is, an IPv6 one as its /64."""
    if not address:
        return ""
    if ":" not in address:
        return address[:KEY_CHARS]
    try:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    except ValueError:  # (a scope ID, or not an address at all)
        return address[:KEY_CHARS]
