"""Every error the project raises on purpose, rooted in one class.

Callers dispatch on the class, never on the message. "You called it wrong"
(`UsageError` and its children) is kept apart from "a service failed"
(`ServiceError` and its children), so the command line can print one clear
line for either and a worker knows which failures are worth a retry.
"""

from __future__ import annotations


class SeckillError(Exception):
    """Root of every error raised by this project."""


# -- you called it wrong ---------------------------------------------------


class UsageError(SeckillError):
    """The caller passed something that can never work; retrying won't help."""


class ConfigError(UsageError):
    """A setting has a value of the wrong kind or out of range."""


class InvalidInput(UsageError):
    """An ID, body or field failed validation before any service was called."""


class UnknownProduct(UsageError):
    """A product ID that has no row in `products`."""


# -- a service failed --------------------------------------------------------


class ServiceError(SeckillError):
    """Redis, RabbitMQ or PostgreSQL failed or did not answer in time."""


class ServiceUnavailable(ServiceError):
    """A service could not be reached at all (connection refused, DNS, auth)."""


class PublishFailed(ServiceError):
    """An event was returned, nacked or not confirmed in time."""


class DatabaseFailed(ServiceError):
    """A batch could not be committed to PostgreSQL."""


class SaleStateCorrupt(ServiceError):
    """A sale's Redis keys hold what the gate cannot use (a string where the stream
    belongs, a fractional stock); the gate refused before writing anything, and no
    retry helps until an operator reopens the sale or fixes the key."""


# -- instance IDs ------------------------------------------------------------


class IdError(SeckillError):
    """The snowflake generator cannot issue an ID right now."""


class ClockMovedBackwards(IdError):
    """The wall clock went back further than the configured bound."""


class NoFreeNodeId(IdError):
    """All 1024 node IDs are leased by live owners."""


class LeaseLost(IdError):
    """Our node-ID lease could not be renewed in time; IDs must stop."""


# -- process lifecycle -------------------------------------------------------


class BootError(SeckillError):
    """A worker could not start; the supervisor must not respawn it blindly."""


# -- refused to protect the service ----------------------------------------


class Overloaded(SeckillError):
    """Refused at once, before the work, to keep serving others: too many requests in
    flight in this process, or too many failed attempts from one client (HTTP 429).
    `retry_after`: seconds after which a new attempt may pass."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def one_line(exc: BaseException, *, typed: bool = False) -> str:
    """An exception as one line: for a log field, a dead letter's `error`, a CLI message.

    Client libraries put DETAIL, HINT or a server's whole answer on further lines, which
    would break a one-event-per-line log and a stream field; an empty message says
    nothing, so the type's name stands in. `typed` prefixes the type where the reader
    needs it to tell a bug from an outage.
    """
    lines = str(exc).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if typed else text


# -- the test harness (engine.testing) -------------------------------------


class HarnessError(SeckillError):
    """The test harness could not do what a test, the bench or the chaos suite asked."""


class WaitTimedOut(HarnessError):
    """A condition the harness waited for did not hold by its deadline."""


class ChildFailed(HarnessError):
    """A child process the harness started exited, or never answered, while starting."""
