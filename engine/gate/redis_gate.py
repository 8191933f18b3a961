"""The gate: one Redis Lua script per purchase attempt, and sales opened and closed.

Everything that decides whether a user gets a unit happens inside Redis in
one script (sale open, not a buyer yet, stock left, then DECR + SADD + XADD),
so no interleaving of thousands of concurrent attempts can oversell. IDs are
validated here, before Redis is touched.

After sell-out the same holds for the waitlist: joining it is one script
(lua/waitlist.lua), and a returned unit goes to its head in the very script that
returns it (lua/refund.lua), so a unit is handed on exactly once, in join order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, NoReturn, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from engine.config import Settings
from engine.connections import REDIS_ERRORS, connect_redis, is_cluster
from engine.errors import ConfigError, InvalidInput, SaleStateCorrupt, ServiceUnavailable
from engine.gate.pipe import ScriptPipe
from engine.gate.routed import RoutedScript, WaitFor
from engine.keys import GROUP, Keys
from engine.resources import lua_script

# "unreplicated": accepted by the master, but fewer replicas than gate_wait_replicas
# acknowledged it within gate_wait_ms (recorded, not yet safe from a failover)
Outcome = Literal["accepted", "duplicate", "sold_out", "no_sale", "rate_limited",
                  "not_started", "ended", "unreplicated"]
# "refunded": back to stock; "handed": to the waitlist's first user, as a new order
RefundOutcome = Literal["refunded", "already_refunded", "sale_changed", "handed"]
WaitlistOutcome = Literal["joined", "waiting", "buyer", "stock_left", "full", "no_sale",
                          "rate_limited", "not_started", "ended"]
MAX_ID = 2**63 - 1
_OUTCOMES: dict[int, Outcome] = {0: "no_sale", 1: "accepted", 2: "duplicate", 3: "sold_out",
                                 4: "rate_limited", 5: "not_started", 6: "ended"}
_REFUNDS: dict[int, RefundOutcome] = {1: "refunded", 2: "already_refunded", 3: "sale_changed",
                                      4: "handed"}
_WAITLIST: dict[int, WaitlistOutcome] = {0: "no_sale", 1: "joined", 2: "buyer",
                                         3: "stock_left", 4: "rate_limited", 5: "not_started",
                                         6: "ended", 7: "waiting", 8: "full"}
WAITLIST_MAX = 100_000  # the waitlist_max setting's default
ENDED_KEEP_S = 7 * 86400  # how long users waiting when a sale closed read ENDED
# Release signals kept (about): a worker reads them every release_poll_interval, and one
# that fell further behind than this still finds the request in its slow sweep.
RELEASE_SIGNALS_KEPT = 10_000
# The error code (first word of the error reply) the scripts use for keys in a bad state;
# Redis error replies carry their class that way, like WRONGTYPE or NOSCRIPT.
BADSTATE = "SECKILL_BADSTATE"
T = TypeVar("T")

log = logging.getLogger("seckill.gate")


class GateResult(NamedTuple):
    """One attempt's answer (a named tuple: made per purchase, it costs a third of a
    frozen dataclass)."""

    outcome: Outcome
    stream_id: str | None = None
    slot: int | None = None
    retry_after_ms: int = 0  # rate_limited: when the next attempt may pass
    limited_by: str | None = None  # rate_limited: "user" or "ip"
    at_ms: int | None = None  # not_started: the start; ended: the end (unix ms)


class Returned(NamedTuple):
    """What became of a returned unit (`Gate.return_unit`): for "handed", the waiting
    user who got it and their new order's stream entry ID."""

    outcome: RefundOutcome
    user_id: int | None = None
    stream_id: str | None = None


class WaitlistResult(NamedTuple):
    """One attempt to join a waitlist (`Gate.join_waitlist`)."""

    outcome: WaitlistOutcome
    position: int | None = None  # joined, waiting: 1 = the next unit returned is theirs
    retry_after_ms: int = 0  # rate_limited
    limited_by: str | None = None  # rate_limited: "user" or "ip"
    at_ms: int | None = None  # not_started: the start; ended: the end (unix ms)
    most: int | None = None  # full: the waitlist's cap


class Position(NamedTuple):
    """A user's place in the waitlist (`Gate.position`): "waiting" with the position
    (1 = next) and the units handed out from the waitlist so far, "ended" (was waiting
    when the sale ended or closed), or "none"."""

    state: Literal["waiting", "ended", "none"]
    position: int | None = None
    handed: int = 0


@dataclass(frozen=True, slots=True)
class WaitlistFigures:
    """A sale's waitlist for `seckill stats`: users waiting now, units handed out from
    it, release requests recorded."""

    waiting: int
    handed: int
    released: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Purchase attempts per second and burst, per user and per client IP (0 = no limit).
    A sale opened with its own limits overrides these in Redis."""

    user_rate: float = 0.0
    user_burst: int = 1
    ip_rate: float = 0.0
    ip_burst: int = 1

    def args(self) -> list[str | int]:
        return [repr(self.user_rate), self.user_burst, repr(self.ip_rate), self.ip_burst]


@dataclass(frozen=True, slots=True)
class Window:
    """When a sale sells (unix ms; None = from its opening / until it is closed)."""

    start_ms: int | None = None
    end_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SaleState:
    sale_id: str | None
    stock: int | None
    buyers: int


def validate_id(name: str, value: object) -> int:
    """A positive int64 from an int or a decimal string; anything else is InvalidInput."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name}: expected a positive 64-bit integer, got {value!r}")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if not isinstance(value, int) or not 0 < value <= MAX_ID:
        raise InvalidInput(f"{name}: expected a positive 64-bit integer, got {_shown(value)}")
    return value


SHOWN = 40  # characters of a refused value an error message repeats at most


def _shown(value: object) -> str:
    """A refused value as a message quotes it: its repr, cut to SHOWN characters (a
    client's 5,000-digit ID is not sent back whole)."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 \
        else f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


class _Script:
    """A Lua script called by EVALSHA, loaded once, reloaded after SCRIPT FLUSH.

    One call, one command: the purchases of a busy server are coalesced by ScriptPipe
    (engine/gate/pipe.py, a single Redis) or RoutedScript (engine/gate/routed.py, a
    cluster or WAIT) instead.
    """

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.source = lua_script(name)
        self.sha: str | None = None

    async def __call__(self, keys: list[str], args: list[str | int]) -> object:
        return await _named_errors(self._evalsha(keys, args))

    async def _evalsha(self, keys: list[str], args: list[str | int]) -> object:
        if self.sha is None:
            self.sha = await self.redis.script_load(self.source)
        try:
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await self.redis.script_load(self.source)
            return await self.redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def _named_errors(call: Awaitable[T]) -> T:
    """A script call's reply, its failures as our named errors."""
    try:
        return await call
    except REDIS_ERRORS as exc:
        _raise_named(exc)


def _raise_named(exc: BaseException) -> NoReturn:
    """Raise what a failed script call stands for: a bad sale state or an unreachable
    Redis as our named errors, any other error reply as it is."""
    if not isinstance(exc, ResponseError):
        raise ServiceUnavailable(f"Redis: {exc}") from exc
    if str(exc).startswith(BADSTATE + " "):
        raise SaleStateCorrupt(f"Redis: {str(exc)[len(BADSTATE) + 1:]}") from exc
    raise exc


def _accepted(reply: object) -> bool:
    return isinstance(reply, list) and int(reply[0]) == 1


class Gate:
    def __init__(self, redis: Redis, keys: Keys, *, coalesce: bool = False,
                 limits: Limits | None = None, wait: WaitFor | None = None,
                 waitlist_max: int = WAITLIST_MAX) -> None:
        """`coalesce`: send the purchase attempts of one loop turn together (for a server
        answering many users at once, like the BFF): down one connection of the gate's
        own on a single Redis (ScriptPipe), per master on a cluster (RoutedScript).
        `limits`: the default rate
        limits of every attempt (a sale's own limits win). `wait`: replicas that must
        acknowledge an accepted purchase (WAIT, `WaitFor.of(settings)`), else the
        attempt is "unreplicated"; its attempts are coalesced too. `waitlist_max`:
        users a sale's waitlist takes at most (a sale's own cap wins)."""
        self.redis = redis
        self.keys = keys
        self.limits = (limits or Limits()).args()
        self._buy = _Script(redis, "seckill.lua")
        # WAIT must follow the purchases on their own connection, per master: RoutedScript
        self._routed: RoutedScript | ScriptPipe | None = None
        if coalesce and wait is None and not is_cluster(redis):
            self._routed = ScriptPipe(redis, self._buy.source)
        elif coalesce or wait is not None:
            self._routed = RoutedScript(redis, self._buy.source, wait, wrote=_accepted)
        self._refund = _Script(redis, "refund.lua")
        self._join = _Script(redis, "waitlist.lua")
        self._position = _Script(redis, "position.lua")
        self._release = _Script(redis, "release.lua")
        self._end_source = lua_script("end_waitlist.lua")  # (EVAL inside a MULTI)
        self.waitlist_max = waitlist_max

    async def close(self) -> None:
        """Close the gate's own connection (the coalesced purchases'); the Redis client
        passed in is the caller's to close."""
        if isinstance(self._routed, ScriptPipe):
            await self._routed.close()

    def _product_keys(self, pid: int) -> list[str]:
        k = self.keys
        return [k.stock(pid), k.sale(pid), k.buyers(pid), k.free_slots(pid)]

    async def buy(self, product_id: int, user_id: int, ts: int | None = None,
                  ip: str | None = None) -> GateResult:
        """One attempt by `user_id`, from client address `ip` when known (per-IP limit)."""
        return await self.attempt(validate_id("product_id", product_id),
                                  validate_id("user_id", user_id), ts, ip)

    async def attempt(self, pid: int, uid: int, ts: int | None = None,
                      ip: str | None = None, trace: str | None = None) -> GateResult:
        """`buy` with IDs its caller has validated already (`validate_id`): the BFF's,
        which checked them before reading the body and pays for that once. `trace`: a
        sampled attempt's context (engine.tracing), for its order's stream entry."""
        keys, args = self.attempt_call(pid, uid, ts, ip, trace)
        acked = None
        if self._routed is None:
            reply = await self._buy(keys, args)
        else:
            try:  # (the call's future awaited here: no coroutine of _named_errors around it)
                reply, acked = await self._routed(keys, args)
            except REDIS_ERRORS as exc:
                _raise_named(exc)
        assert isinstance(reply, list)
        outcome = _OUTCOMES[int(reply[0])]
        if outcome == "rate_limited":
            by = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            return GateResult(outcome, retry_after_ms=int(reply[1]), limited_by=by)
        if outcome in ("not_started", "ended"):
            return GateResult(outcome, at_ms=int(reply[1]))
        if outcome != "accepted":
            return GateResult(outcome)
        stream_id = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        wait = None if self._routed is None else self._routed.wait
        if wait is not None and (acked or 0) < wait.replicas:
            return GateResult("unreplicated", stream_id, int(reply[2]))
        return GateResult(outcome, stream_id, int(reply[2]))

    def attempt_call(self, pid: int, uid: int, ts: int | None = None,
                     ip: str | None = None, trace: str | None = None
                     ) -> tuple[list[str], list[str | int]]:
        """The purchase script's keys and arguments for one attempt (bench/gatescript.py
        calls the script with these too). The limits' arguments end at the last one that
        is set: every argument costs the script's one Redis thread on every call. A
        sampled attempt's `trace` follows all four (ARGV[7]): only it pays for them."""
        k = self.keys
        # no address, no per-IP key (KEYS[9] nil): an empty key name would hash to slot
        # 0 and make the call CROSSSLOT on a Redis Cluster
        keys = [*self._product_keys(pid), k.stream(pid), k.window(pid), k.gate_state(pid),
                k.user_limiter(pid, uid), *([k.ip_limiter(pid, ip)] if ip else [])]
        limits = self.limits
        if trace:
            return keys, [uid, int(time.time()) if ts is None else ts, *limits, trace]
        if float(limits[2]) == 0:
            limits = limits[:2] if float(limits[0]) else []
        return keys, [uid, int(time.time()) if ts is None else ts, *limits]

    async def refund(self, product_id: int, user_id: int, sale_id: str, slot: int | None,
                     stream_id: str) -> RefundOutcome:
        """Return the unit of `user_id`'s order `stream_id` (failed, or released):
        "handed" to the waitlist's first user, "refunded" to stock (nobody waiting, or
        the window has ended), "already_refunded", or "sale_changed" (nothing returned).
        `return_unit` says who got a handed unit."""
        return (await self.return_unit(product_id, user_id, sale_id, slot, stream_id)).outcome

    async def return_unit(self, product_id: int, user_id: int, sale_id: str,
                          slot: int | None, stream_id: str) -> Returned:
        """`refund`, with the waiting user who got the unit and their new order."""
        pid = validate_id("product_id", product_id)
        uid = validate_id("user_id", user_id)
        k = self.keys
        reply = await self._refund(
            [*self._product_keys(pid), k.refunded(pid), k.waitlist(pid), k.stream(pid),
             k.window(pid), k.waitlist_stats(pid)],
            [uid, sale_id, "" if slot is None else slot, stream_id])
        if isinstance(reply, list):  # {4, user ID, stream entry ID}
            return Returned("handed", int(reply[1]), _text(reply[2]))
        return Returned(_REFUNDS[int(reply)])  # type: ignore[call-overload]

    async def join_waitlist(self, product_id: int, user_id: int,
                            ip: str | None = None) -> WaitlistResult:
        """`user_id` joins the sold-out sale's waitlist (from client address `ip` when
        known: the purchase's per-IP limit)."""
        pid = validate_id("product_id", product_id)
        uid = validate_id("user_id", user_id)
        k = self.keys
        keys = [k.stock(pid), k.sale(pid), k.buyers(pid), k.waitlist(pid),
                k.waitlist_seq(pid), k.window(pid), k.user_limiter(pid, uid),
                *([k.ip_limiter(pid, ip)] if ip else [])]
        reply = await self._join(keys, [uid, self.waitlist_max, *self.limits])
        assert isinstance(reply, list)
        outcome = _WAITLIST[int(reply[0])]
        if outcome in ("joined", "waiting"):
            return WaitlistResult(outcome, position=int(reply[1]))
        if outcome == "rate_limited":
            return WaitlistResult(outcome, retry_after_ms=int(reply[1]),
                                  limited_by=_text(reply[2]))
        if outcome in ("not_started", "ended"):
            return WaitlistResult(outcome, at_ms=int(reply[1]))
        if outcome == "full":
            return WaitlistResult(outcome, most=int(reply[1]))
        return WaitlistResult(outcome)

    async def position(self, product_id: int, user_id: int) -> Position:
        """Where `user_id` stands in the waitlist: one ZRANK."""
        pid = validate_id("product_id", product_id)
        uid = validate_id("user_id", user_id)
        k = self.keys
        reply = await self._position(
            [k.waitlist(pid), k.waitlist_stats(pid), k.window(pid), k.waitlist_ended(pid)],
            [uid])
        assert isinstance(reply, list)
        if int(reply[0]) == 1:
            return Position("waiting", int(reply[1]), int(reply[2]))
        return Position("ended" if int(reply[0]) == 2 else "none")

    async def leave_waitlist(self, product_id: int, user_id: int) -> bool:
        """Take `user_id` out of the waitlist; False if they were not waiting."""
        pid = validate_id("product_id", product_id)
        uid = validate_id("user_id", user_id)
        try:
            return bool(await self.redis.zrem(self.keys.waitlist(pid), str(uid)))
        except REDIS_ERRORS as exc:
            _raise_named(exc)

    async def record_release(self, product_id: int, user_id: int, instance_id: int,
                             stream_id: str, sale_id: str | None) -> bool:
        """Ask for the release of order `stream_id` (its instance `instance_id`): one
        entry in the product's release stream per order; False if already asked."""
        pid = validate_id("product_id", product_id)
        uid = validate_id("user_id", user_id)
        k = self.keys
        reply = await self._release(
            [k.release_requested(pid), k.releases(pid), k.waitlist_stats(pid)],
            [uid, instance_id, stream_id, sale_id or ""])
        assert isinstance(reply, list)
        if int(reply[0]) != 1:
            return False
        await self._signal_release(pid)
        return True

    async def _signal_release(self, pid: int) -> None:
        """Tell the engine's workers which product has a new release request (they read
        that stream then, not all of them). Recorded already: a signal lost here only
        delays the request to the workers' slow sweep of every stream."""
        try:
            await self.redis.xadd(self.keys.release_signals, {"pid": pid},
                                  maxlen=RELEASE_SIGNALS_KEPT, approximate=True)
        except REDIS_ERRORS as exc:
            log.warning("release of product %d recorded, its signal not: %s", pid, exc,
                        extra={"event": "release_signal_failed", "product_id": pid})

    async def waitlist_figures(self, product_id: int) -> WaitlistFigures:
        pid = validate_id("product_id", product_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.waitlist(pid))
        pipe.hmget(self.keys.waitlist_stats(pid), "handed", "released")
        waiting, (handed, released) = await pipe.execute()
        return WaitlistFigures(int(waiting), int(handed or 0), int(released or 0))

    async def open_sale(self, product_id: int, stock: int, *, clear_buyers: bool = False,
                        window: Window | None = None, limits: Limits | None = None,
                        waitlist_max: int | None = None) -> str:
        """A new sale ID, stock set, the stream and its group ready for the engine; the
        sale sells within `window` and with its own `limits` and waitlist cap when
        given. The previous sale's waitlist ends (its users read ENDED)."""
        pid = validate_id("product_id", product_id)
        if isinstance(stock, bool) or not isinstance(stock, int) or not 0 < stock < 2**31:
            raise InvalidInput(f"stock: expected a positive integer, got {stock!r}")
        schedule = _window_fields(window or Window(), limits)
        if waitlist_max is not None:
            if isinstance(waitlist_max, bool) or not isinstance(waitlist_max, int) \
                    or waitlist_max < 0:
                raise InvalidInput(f"waitlist_max: expected an integer >= 0, got "
                                   f"{waitlist_max!r}")
            schedule["waitlist_max"] = waitlist_max
        sale_id = f"{time.time_ns() // 1_000_000:x}-{secrets.token_hex(2)}"
        k = self.keys
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(k.stock(pid), stock)
            pipe.set(k.sale(pid), sale_id)
            pipe.delete(k.free_slots(pid), k.window(pid), k.gate_state(pid))
            self._end_waitlist(pipe, pid)
            pipe.delete(k.waitlist_stats(pid))
            if schedule:
                pipe.hset(k.window(pid), mapping=schedule)  # type: ignore[arg-type]
            if window is None or window.start_ms is None:  # open now: no clock to read
                pipe.set(k.gate_state(pid), _gate_state(sale_id, schedule),
                         pxat=None if window is None or window.end_ms is None
                         else window.end_ms - 1)
            if clear_buyers:
                pipe.delete(k.buyers(pid))
            await pipe.execute()
            try:
                await self.redis.xgroup_create(k.stream(pid), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            await self.redis.sadd(k.streams, pid)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable(f"Redis: {exc}") from exc
        return sale_id

    async def close_sale(self, product_id: int) -> None:
        """Stop selling; the stream, group and buyers stay so the backlog drains. The
        waitlist closes: its users read ENDED; its figures stay until the next sale."""
        pid = validate_id("product_id", product_id)
        k = self.keys
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(k.stock(pid), k.sale(pid), k.window(pid))
            self._end_waitlist(pipe, pid)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable(f"Redis: {exc}") from exc

    def _end_waitlist(self, pipe: Any, pid: int) -> None:
        """Queue on `pipe` the end of the product's waitlist: its users move to the
        ended set (kept ENDED_KEEP_S, so that they read ENDED), the waitlist and its
        turn counter go. No unit can be handed from it any more."""
        k = self.keys
        pipe.eval(self._end_source, 3, k.waitlist(pid), k.waitlist_ended(pid),
                  k.waitlist_seq(pid), ENDED_KEEP_S)

    async def schedule(self, product_id: int) -> tuple[str | None, int | None, Window, int]:
        """(sale ID, stock, window, Redis time in unix ms), in one round trip: what the
        public sale page shows, from Redis alone (a failure raises Redis's own error)."""
        pid = validate_id("product_id", product_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.sale(pid))
        pipe.get(self.keys.stock(pid))
        pipe.hmget(self.keys.window(pid), "start", "end")
        pipe.time()
        sale, stock, (start, end), (secs, micros) = await pipe.execute()
        return (sale.decode() if isinstance(sale, bytes) else sale, _int_or_none(stock),
                Window(_int_or_none(start), _int_or_none(end)), secs * 1000 + micros // 1000)

    async def sale_state(self, product_id: int) -> SaleState:
        pid = validate_id("product_id", product_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.sale(pid))
        pipe.get(self.keys.stock(pid))
        pipe.scard(self.keys.buyers(pid))
        sale, stock, buyers = await pipe.execute()
        return SaleState(sale.decode() if isinstance(sale, bytes) else sale,
                         None if stock is None else int(stock), int(buyers))


def _gate_state(sale_id: str, schedule: dict[str, str | int]) -> str:
    """The gate state of an open sale (engine/lua/seckill.lua reads it): its ID, then
    its own limits if it has any, tab-separated."""
    names = ("user_rate", "user_burst", "ip_rate", "ip_burst")
    if not any(name in schedule for name in names):
        return sale_id
    return "\t".join([sale_id, *(str(schedule.get(name, "")) for name in names)])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _window_fields(window: Window, limits: Limits | None) -> dict[str, str | int]:
    """The window hash of a sale: only what is set, so the caller's defaults apply."""
    if window.start_ms is not None and window.end_ms is not None \
            and window.end_ms <= window.start_ms:
        raise InvalidInput("end: expected a time after the start")
    fields: dict[str, str | int] = {}
    if window.start_ms is not None:
        fields["start"] = window.start_ms
    if window.end_ms is not None:
        fields["end"] = window.end_ms
    if limits is not None:
        if limits.user_rate < 0 or limits.ip_rate < 0 or limits.user_burst < 1 \
                or limits.ip_burst < 1:
            raise InvalidInput("limits: rates >= 0 (0 = none), bursts >= 1")
        fields.update(user_rate=repr(limits.user_rate), user_burst=limits.user_burst,
                      ip_rate=repr(limits.ip_rate), ip_burst=limits.ip_burst)
    return fields


async def check_replication(redis: Redis, replicas: int, *, setting: str = "gate_min_replicas",
                            required_per_write: bool = True) -> None:
    """Refuse (ConfigError) unless every master has `replicas` replicas attached and
    (`required_per_write`) requires as many for each write (`min-replicas-to-write`).
    For `gate_wait_replicas` only the replicas are checked: with fewer, every accepted
    purchase would wait out gate_wait_ms and be answered 503.

    With that setting a master refuses the purchase script's writes (the gate answers
    503) when its replicas fall behind by more than `min-replicas-max-lag` seconds, so
    an order answered 202 can only be lost by a failover within that lag. The database's
    slot index stays the last guard against a unit sold twice after one.
    """
    if replicas <= 0:
        return
    nodes = redis.get_primaries() if is_cluster(redis) else [None]  # type: ignore[attr-defined]
    for node in nodes:
        where = {} if node is None else {"target_nodes": node}
        name = "Redis" if node is None else f"Redis master {node.host}:{node.port}"
        try:
            info = await redis.execute_command("INFO", "replication", **where)
            config = await redis.execute_command("CONFIG GET", "min-replicas-to-write", **where)
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable(f"{name}: {exc}") from exc
        attached = int(info.get("connected_slaves", 0))
        required = int(_config_value(config, "min-replicas-to-write"))
        if attached < replicas and not required_per_write:
            raise ConfigError(f"{setting} = {replicas}: {name} has {attached} replica(s) "
                              f"attached; attach replicas or lower {setting}")
        if required_per_write and (attached < replicas or required < replicas):
            raise ConfigError(
                f"{setting} = {replicas}: {name} has {attached} replica(s) attached "
                f"and min-replicas-to-write {required}; attach replicas and run "
                f"CONFIG SET min-replicas-to-write {replicas} (and in its redis.conf)")


def ensure_replication(settings: Settings) -> None:
    """`check_replication` for the BFF's start, before it serves anyone: of
    `gate_min_replicas` and of `gate_wait_replicas`."""
    if settings.gate_min_replicas <= 0 and settings.gate_wait_replicas <= 0:
        return

    async def check() -> None:
        redis = await connect_redis(settings)
        try:
            await check_replication(redis, settings.gate_min_replicas)
            await check_replication(redis, settings.gate_wait_replicas,
                                    setting="gate_wait_replicas", required_per_write=False)
        finally:
            await redis.aclose()

    asyncio.run(check())


def _config_value(reply: object, name: str) -> str:
    """CONFIG GET's value: a dict (RESP3, or parsed) or a flat [name, value] list."""
    if isinstance(reply, dict):
        value = reply.get(name, reply.get(name.encode(), 0))
    else:
        items = list(reply) if isinstance(reply, list | tuple) else []
        value = items[1] if len(items) > 1 else 0
    return value.decode() if isinstance(value, bytes) else str(value)
