"""What the BFF refuses before doing the work, to keep serving everyone else.

A process that takes on more requests than it can answer in time answers all of
them late; one that refuses the surplus at once (429) keeps answering the rest in
time, and a client told so can come back. The cap wraps the work of a request as
uvicorn's concurrency limit wraps an application: counted while it runs, refused
before it starts once the count is reached.
"""

from __future__ import annotations

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
