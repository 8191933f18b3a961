"""`seckill bff`: the HTTP gate, a bare RSGI and ASGI application served by Granian.

One gate call per purchase attempt and nothing else on the hot path: input
is validated before Redis is touched, a sale known to be sold out is
answered from memory for `bff_soldout_recheck` seconds, and past
`bff_max_inflight` concurrent requests a process answers 429 at once, so a
burst degrades into fast refusals instead of a queue of slow answers.

A client always gets JSON: a Redis or PostgreSQL failure is a 503 it may
retry, anything else a 500, and the error is logged, never swallowed.

The buyer is the `sub` of a verified bearer token (engine.gate.auth); a bad
token is refused before the body is read and before Redis is touched, and a
client whose tokens keep failing is refused before its next signature check
(engine.gate.guards), since that check is the dearest work a stranger can make
the BFF do. With `bff_auth = "none"` (demos, tests) the body's `user_id` names
the buyer.

The API is a table (`BffApp.routes`: a path shape, then a method, to a handler),
and a failure becomes a status in one place (`HTTP_STATUS_OF_ERROR`, `_failed`): a
handler raises a named error and never builds an error answer itself, so a new
endpoint is a row and a handler, and every endpoint answers a failure alike.

Granian serves it over RSGI (`bff_interface`); the same object is an ASGI
application for any other server (engine.gate.request reads a request from
either).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisClusterException, RedisError

from engine import tracing
from engine.config import Settings, load_settings
from engine.connections import PG_ERRORS, connect_redis, create_pg_pool
from engine.errors import ConfigError, InvalidInput, Overloaded, ServiceUnavailable
from engine.gate.auth import Forbidden, KeySet, Unauthenticated, Verifier
from engine.gate.clientip import ClientIp, parse_proxies
from engine.gate.guards import FailureThrottle, InflightCap
from engine.gate.redis_gate import (
    Gate,
    GateResult,
    Limits,
    WaitlistResult,
    ensure_replication,
    validate_id,
)
from engine.gate.releases import LATEST_ORDER as ORDER_TO_RELEASE
from engine.gate.releases import NoOrder, NotReleasable, request_release
from engine.gate.request import (
    AsgiRequest,
    BodyDeadlines,
    BodyTimeout,
    BodyTooLarge,
    Request,
    RsgiRequest,
)
from engine.gate.routed import UNREPLICATED_MESSAGE, WaitFor
from engine.keys import Keys
from engine.orderstates import ENDED, FINAL, WAITLISTED

log = logging.getLogger("seckill.bff")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 1024
PREFIX = "/api/v1/seckill/"
SERVICE = "seckill-bff"  # the traces' service name, unless OTEL_SERVICE_NAME says otherwise
BUY_ROUTE = PREFIX + "{product_id}"
BUY_SPAN = "POST " + BUY_ROUTE
# a gate outcome's HTTP status (engine.gate.redis_gate.Outcome)
HTTP_STATUS_OF_OUTCOME = {"accepted": 202, "duplicate": 409, "sold_out": 410, "no_sale": 404,
                          "rate_limited": 429, "not_started": 425, "ended": 410,
                          "unreplicated": 503}
Headers = list[tuple[str, str]]  # beyond the content type: as RSGI takes them
Answer = tuple[int, bytes, Headers]  # status, JSON body, headers
SALE_PAGE: Headers = [("cache-control", "public, max-age=1")]
JSON: Headers = [("content-type", "application/json")]
ASGI_JSON = [(b"content-type", b"application/json")]
CHALLENGE = 'Bearer realm="seckill"'
NO_AUTH_WARNING = ("bff_auth = 'none': no token is checked, the body's user_id names the "
                   "buyer, so anyone can buy and read orders for anyone")
# what a failed or unreachable service raises, beyond our own ServiceUnavailable
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
UNAVAILABLE = {"buy": "the gate is unavailable, try again",
               "order": "order state is unavailable, try again",
               "waitlist": "the waitlist is unavailable, try again",
               "release": "order state is unavailable, try again"}
# a waitlist join's HTTP status (engine.gate.redis_gate.WaitlistOutcome)
HTTP_STATUS_OF_WAITLIST = {"joined": 202, "waiting": 200, "buyer": 409, "stock_left": 409,
                           "full": 410, "no_sale": 404, "not_started": 425, "ended": 410,
                           "rate_limited": 429}
WAITLIST_MESSAGES = {"buyer": "you hold a live order for this product",
                     "stock_left": "units are still for sale: buy instead "
                                   "(POST /api/v1/seckill/{product})",
                     "full": "the waitlist is full ({most} waiting)"}

LATEST_ORDER = """
SELECT status, instance_id, endpoint, reason, compensated_at FROM seckill_logs
WHERE product_id = $1 AND user_id = $2 ORDER BY id DESC LIMIT 1
"""


class HttpError(Exception):
    """A refusal that is about HTTP itself (no such path, a method the path does not
    take): it carries its own status and headers."""

    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


# The one place a failure becomes a status: the entry of the most specific class the
# exception is an instance of (its MRO); an HttpError carries its own, anything else
# is a bug (500).
HTTP_STATUS_OF_ERROR: dict[type[BaseException], int] = {
    InvalidInput: 400, Unauthenticated: 401, Forbidden: 403, NoOrder: 404, BodyTimeout: 408,
    NotReleasable: 409, Overloaded: 429, ServiceUnavailable: 503,
    **dict.fromkeys(REDIS_ERRORS, 503)}


def http_status_of(exc: BaseException) -> int:
    """The HTTP status a failure is answered with (HTTP_STATUS_OF_ERROR)."""
    if isinstance(exc, HttpError):
        return exc.status
    for kind in type(exc).__mro__:
        status = HTTP_STATUS_OF_ERROR.get(kind)
        if status is not None:
            return status
    return 500


Handler = Callable[[Request, list[str]], Awaitable[Answer]]


class Route:
    """One path shape of the API (`_route`): its handler and metrics label per method;
    another method is 405 with the ones it takes in Allow."""

    __slots__ = ("allow", "endpoint", "methods")

    def __init__(self, methods: dict[str, tuple[str, Handler]]) -> None:
        self.methods = methods
        self.endpoint = next(iter(methods.values()))[0]  # the label of a refused method
        self.allow = ", ".join(sorted(methods))


def _challenge(exc: Exception) -> Headers:
    """RFC 6750: what the client must send, and why this token was refused."""
    why = str(exc).replace("\\", "").replace('"', "'")[:200]
    why = why.encode("ascii", "replace").decode("ascii")
    return [("www-authenticate",
             CHALLENGE + ', error="invalid_token", error_description="' + why + '"')]


class BffApp:
    """The RSGI and ASGI application of one process; connections are opened on first
    use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.gate: Gate | None = None
        self.pool: Any = None
        # the first requests arrive together: one opens, the others wait for it (without
        # the lock each opened its own pool, and a burst ran PostgreSQL out of connections)
        self.opening = {"gate": asyncio.Lock(), "pool": asyncio.Lock()}
        self.inflight = InflightCap(settings.bff_max_inflight)
        self.auth_failures = FailureThrottle(settings.bff_auth_failure_rate,
                                             settings.bff_auth_failure_burst)
        self.deadlines = BodyDeadlines(settings.bff_body_timeout)
        self.sold_out: dict[int, float] = {}
        self.client_ip = ClientIp(parse_proxies(settings.bff_trusted_proxies))
        self.limits = Limits(settings.bff_user_rate, settings.bff_user_burst,
                             settings.bff_ip_rate, settings.bff_ip_burst)
        self.verifier: Verifier | None = None
        if settings.bff_auth == "jwt":
            self.verifier = Verifier(settings, load_keys(settings))
        from engine.metrics import bff as bffmetrics

        self.metrics = bffmetrics
        # the API: a path shape (_route) -> method -> (metrics label, handler)
        # trace_sample 0: no tracing at all, and the route holds the untraced handler
        self.tracing = tracing.setup(settings, SERVICE)
        buy = self._buy if self.tracing is None else self._traced_buy
        self.routes: dict[str, Route] = {
            "buy": Route({"POST": ("buy", buy), "GET": ("sale", self._sale)}),
            "order": Route({"GET": ("order", self._order),
                            "DELETE": ("release", self._release)}),
            "mine": Route({"GET": ("order", self._my_order),
                           "DELETE": ("release", self._release_mine)}),
            "waitlist": Route({"POST": ("waitlist", self._join)}),
            "healthz": Route({"GET": ("healthz", self._health),
                              "HEAD": ("healthz", self._health)}),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        endpoint, status, body, extra = await self._dispatch(AsgiRequest(scope, receive))
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
        await send({"type": "http.response.start", "status": status,
                    "headers": ASGI_JSON + headers if headers else ASGI_JSON})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe(endpoint, status, time.perf_counter() - started)

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        """Granian's RSGI: one call answers, headers are read from Rust on demand."""
        if scope.proto != "http":
            return
        started = time.perf_counter()
        endpoint, status, body, extra = await self._dispatch(RsgiRequest(scope, protocol))
        protocol.response_bytes(status, JSON + extra if extra else JSON, body)
        self.metrics.observe(endpoint, status, time.perf_counter() - started)

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """RSGI's start of a worker (its loop not running yet): the JWKS refresh."""
        if self.verifier is not None:
            self.verifier.keyset.start(loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """RSGI's end of a worker (its loop stopped): close what was opened."""
        loop.run_until_complete(self._close())

    async def _dispatch(self, request: Request) -> tuple[str, int, bytes, Headers]:
        """(metrics label, status, body, headers): the route's handler, or the failure
        answered as `_failed` says."""
        kind, ids = _route(request.path)
        route = self.routes.get(kind)
        if route is None:
            return "other", *_failed("other", _unrouted(kind, request.path))
        handler = route.methods.get(request.method)
        if handler is None:
            return route.endpoint, *_failed(route.endpoint, HttpError(
                405, f"method {_echo(request.method)} not allowed here; use "
                     f"{route.allow.replace(', ', ' or ')}", [("allow", route.allow)]))
        endpoint, handle = handler
        try:
            return endpoint, *await handle(request, ids)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, in JSON
            return endpoint, *_failed(endpoint, exc)

    async def _sale(self, request: Request, ids: list[str]) -> Answer:
        """GET .../{product_id}: the public sale page."""
        return 200, await self.sale(ids[0]), SALE_PAGE

    async def _order(self, request: Request, ids: list[str]) -> Answer:
        """GET .../{product_id}/users/{user_id}: a user's order."""
        caller = await self._caller(request)
        return *await self.order(ids[0], ids[1], caller), []

    async def _my_order(self, request: Request, ids: list[str]) -> Answer:
        """GET .../{product_id}/order: the token's user's order."""
        caller = await self._caller(request)
        if caller is None:
            raise InvalidInput("bff_auth = 'none': no caller; use .../users/{user_id}")
        return *await self.order(ids[0], str(caller), caller), []

    async def _join(self, request: Request, ids: list[str]) -> Answer:
        """POST .../{product_id}/waitlist: wait for a returned unit of a sold-out sale."""
        pid = validate_id("product_id", ids[0])
        _bounded(request.header("content-length"))
        caller = await self._caller(request)
        body = await self.deadlines.read(request, MAX_BODY)
        with self.inflight:
            user_id = _identity(request, body, caller)
            gate = await self._gate()
            result = await gate.join_waitlist(pid, user_id, ip=self._client_address(request))
        return _waitlist_answer(pid, result)

    async def _release(self, request: Request, ids: list[str]) -> Answer:
        """DELETE .../{product_id}/users/{user_id}: leave the waitlist or release."""
        caller = await self._caller(request)
        return await self.release(ids[0], ids[1], caller)

    async def _release_mine(self, request: Request, ids: list[str]) -> Answer:
        """DELETE .../{product_id}/order: the token's user leaves or releases."""
        caller = await self._caller(request)
        if caller is None:
            raise InvalidInput("bff_auth = 'none': no caller; use .../users/{user_id}")
        return await self.release(ids[0], str(caller), caller)

    async def release(self, raw_pid: str, raw_uid: str, caller: int | None) -> Answer:
        pid = validate_id("product_id", raw_pid)
        uid = validate_id("user_id", raw_uid)
        if caller is not None and uid != caller:
            raise Forbidden("only the token's own order can be given back")
        with self.inflight:
            done = await request_release(await self._gate(), self._order_to_release, pid, uid)
        return 202 if done.new else 200, orjson.dumps({"state": done.state}), []

    async def _order_to_release(self, pid: int, uid: int) -> Any:
        return await self._fetch_order(ORDER_TO_RELEASE, pid, uid)

    async def _fetch_order(self, query: str, pid: int, uid: int) -> Any:
        """A user's latest order row, the whole wait (a pool connection, then the
        query) bounded by bff_order_timeout."""
        pool = await self._pool()
        try:
            async with asyncio.timeout(self.settings.bff_order_timeout):
                return await pool.fetchrow(query, pid, uid)
        except PG_ERRORS as exc:
            raise ServiceUnavailable(f"PostgreSQL: {exc}") from exc

    async def _health(self, request: Request, ids: list[str]) -> Answer:
        if self.verifier is None:
            return 200, orjson.dumps({"status": "ok", "auth": "none",
                                      "warning": NO_AUTH_WARNING}), []
        return 200, b'{"status":"ok","auth":"jwt"}', []

    async def _caller(self, request: Request) -> int | None:
        """The verified user ID of the request (None when bff_auth = 'none')."""
        if self.verifier is None:
            return None
        header = request.single_header("authorization")
        caller = self.verifier.cached(header)
        return caller if caller is not None else await self._authenticate(request, header)

    async def _authenticate(self, request: Request, header: str | None) -> int:
        """A token this process has not verified yet: checked unless its client's failed
        checks are used up (429 unchecked), counted in flight while it is (a signature
        check is the dearest work a request can cost before it is known to be a buyer's),
        and a refusal spent from its client's failures."""
        assert self.verifier is not None
        address = self._client_address(request)
        self.auth_failures.check(address)
        with self.inflight:
            try:
                return await self.verifier.caller(header)
            except Unauthenticated:
                self.auth_failures.failed(address)
                raise

    def _client_address(self, request: Request) -> str | None:
        """The client's IP: the peer's, or X-Forwarded-For's from a trusted proxy."""
        ip = request.peer()
        if self.client_ip.proxies:  # (else X-Forwarded-For is not even looked at)
            ip = self.client_ip.of(ip, request.header_lines("x-forwarded-for"))
        return ip

    async def _traced_buy(self, request: Request, ids: list[str]) -> Answer:
        """`_buy` with tracing on: an attempt the edge samples (`trace_sample`, or the
        sampled flag of a trusted proxy's `traceparent`) is a server span, whose context
        the gate writes into the order's stream entry. A `traceparent` from anyone else
        is ignored: a client must not choose to be traced, and what that costs us."""
        t = self.tracing
        assert t is not None
        parent = None
        if self.client_ip.trusts(request.peer()):
            parent = t.http_parent(request.header("traceparent"), request.header("tracestate"))
        if not t.sampled(parent):
            return await self._buy(request, ids)
        # (the name says the method and route; the span a record: Tracing.served)
        attributes: dict[str, str | int | float | bool] = {"url.path": request.path}
        with t.served(BUY_SPAN, parent, attributes) as span:
            try:
                answer = await self._buy(request, ids, trace=span.stream_value())
            except Exception as exc:
                attributes["http.response.status_code"] = http_status_of(exc)
                raise
            attributes["http.response.status_code"] = answer[0]
        return answer

    async def _buy(self, request: Request, ids: list[str], trace: str | None = None
                   ) -> Answer:
        """POST .../{product_id}: a purchase attempt (the hot path: one coroutine, the
        token cache and the in-flight cap inline); `trace`: a sampled attempt's context,
        for its stream entry (`_traced_buy`).

        A sale this process knows is sold out is answered 410 before the token is
        verified or the body read: whoever asks, the answer is the same (and public:
        the sale page says so), and past the sold-out moment nearly every attempt is
        one of these. Verifying a token nobody will use, or waiting for a body nobody
        will read, was most of what a refused attempt cost beyond HTTP. Only a request
        with no token at all is still told 401 first."""
        pid = validate_id("product_id", ids[0])
        if self.sold_out and self._known_sold_out(pid, request):
            return 410, b'{"status":"sold_out"}', []
        caller = None
        if self.verifier is not None:  # a retrying buyer: no coroutine, no check
            header = request.single_header("authorization")
            caller = self.verifier.cached(header)
            if caller is None:
                _bounded(request.header("content-length"))  # (no token checked for it)
                caller = await self._authenticate(request, header)
        # the body is read before a request counts as in flight: a client still
        # sending it holds no slot, and is cut off at bff_body_timeout
        body = await self.deadlines.read(request, MAX_BODY)
        with self.inflight:
            body_uid = _user_id(request, body, required=caller is None)
            if caller is not None and body_uid is not None and body_uid != caller:
                raise Forbidden(f"user_id {body_uid} is not the token's user")
            user_id = caller if caller is not None else body_uid
            assert user_id is not None
            ip = self._client_address(request)
            gate = self.gate if self.gate is not None else await self._gate()
            # (both IDs validated above)
            result = await gate.attempt(pid, user_id, ip=ip, trace=trace)
        if result.outcome == "accepted":
            return 202, orjson.dumps({"status": "accepted", "stream_id": result.stream_id,
                                      "slot": result.slot}), []
        return self._refused(pid, result)

    def _known_sold_out(self, pid: int, request: Request) -> bool:
        """`pid` was answered sold out within bff_soldout_recheck, and the request
        carries a token if tokens are required (no token at all is still a 401)."""
        if self.sold_out.get(pid, 0.0) <= time.monotonic():
            return False
        return self.verifier is None or request.header("authorization") is not None

    def _refused(self, pid: int, result: GateResult) -> Answer:
        """The answer to an attempt the gate did not accept (or not safely)."""
        outcome = result.outcome
        if outcome == "sold_out":
            self.sold_out[pid] = time.monotonic() + self.settings.bff_soldout_recheck
            return 410, b'{"status":"sold_out"}', []
        if outcome == "unreplicated":  # gate_wait_replicas: recorded, not yet safe
            self.metrics.UNREPLICATED.inc()
            return 503, orjson.dumps({"status": outcome, "stream_id": result.stream_id,
                                      "message": UNREPLICATED_MESSAGE.format(product=pid),
                                      "slot": result.slot}), []
        if outcome in ("rate_limited", "not_started"):
            return _too_early(outcome, result)
        return HTTP_STATUS_OF_OUTCOME[outcome], orjson.dumps({"status": outcome}), []

    async def sale(self, raw_pid: str) -> bytes:
        """The public sale page: window, state and Redis's clock, never PostgreSQL."""
        pid = validate_id("product_id", raw_pid)
        sale_id, stock, window, now = await (await self._gate()).schedule(pid)
        if sale_id is None or stock is None:
            state = "closed"
        elif window.start_ms is not None and now < window.start_ms:
            state = "scheduled"
        elif window.end_ms is not None and now >= window.end_ms:
            state = "ended"
        else:
            state = "open" if stock > 0 else "sold_out"
        return orjson.dumps({"product_id": pid, "state": state,
                             "start": _iso(window.start_ms), "start_ms": window.start_ms,
                             "end": _iso(window.end_ms), "end_ms": window.end_ms,
                             "server_time": _iso(now), "server_time_ms": now})

    async def order(self, raw_pid: str, raw_uid: str, caller: int | None) -> tuple[int, bytes]:
        pid = validate_id("product_id", raw_pid)
        uid = validate_id("user_id", raw_uid)
        if caller is not None and uid != caller:
            raise Forbidden("only the token's own orders can be read")
        gate = await self._gate()
        place = await gate.position(pid, uid)  # one ZRANK: a waiting user has no live order
        if place.state == "waiting":
            return 200, orjson.dumps({"state": WAITLISTED, "position": place.position,
                                      "handed_out": place.handed})
        row = await self._fetch_order(LATEST_ORDER, pid, uid)
        buyer = await gate.redis.sismember(self.keys.buyers(pid), str(uid))
        # a unit given back (failed, released): a later order, or the waitlist, is newer
        given_back = row is not None and row["status"] in FINAL and row["compensated_at"]
        if row is None or (given_back and (buyer or place.state == "ended")):
            if buyer:  # in the stream, not logged yet (or a new try after a failure)
                return 200, orjson.dumps({"state": "PENDING"})
            if place.state == "ended":  # was waiting when the sale ended or closed
                return 200, orjson.dumps({"state": ENDED})
            raise HttpError(404, f"user {uid} has no order for product {pid}")
        out: dict[str, Any] = {"state": row["status"], "instance_id": str(row["instance_id"])}
        if row["endpoint"]:
            out["endpoint"] = row["endpoint"]
        if row["reason"]:
            out["reason"] = row["reason"]
        return 200, orjson.dumps(out)

    async def _gate(self) -> Gate:
        if self.gate is None:
            async with self.opening["gate"]:
                if self.gate is None:
                    redis = await connect_redis(self.settings, max_connections=1024)
                    self.gate = Gate(redis, self.keys, coalesce=True, limits=self.limits,
                                     wait=WaitFor.of(self.settings),
                                     waitlist_max=self.settings.waitlist_max)
        return self.gate

    async def _pool(self) -> Any:
        if self.pool is None:
            async with self.opening["pool"]:
                if self.pool is None:
                    # as seckill_bff: SELECT on the columns of an order, nothing else
                    self.pool = await create_pg_pool(self.settings.replace(
                        pg_dsn=self.settings.bff_dsn()), size=2)
        return self.pool

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.verifier is not None:
                    self.verifier.keyset.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close(self) -> None:
        if self.tracing is not None:  # (what it holds is exported, within 2 s)
            await asyncio.to_thread(self.tracing.close)
        if self.verifier is not None:
            await self.verifier.keyset.stop()
        if self.gate is not None:
            await self.gate.close()
            await self.gate.redis.aclose()
        if self.pool is not None:
            await self.pool.close()


def _route(path: str) -> tuple[str, list[str]]:
    """("buy", [pid]) for /api/v1/seckill/{pid}, ("order", [pid, uid]) for
    .../{pid}/users/{uid}, ("mine", [pid]) for .../{pid}/order, ("waitlist", [pid]) for
    .../{pid}/waitlist, ("healthz", []) for
    /healthz, ("encoded", []) for an API path with percent-encoding, else ("", [])."""
    if not path.startswith(PREFIX):
        return ("healthz", []) if path.strip("/") == "healthz" else ("", [])
    if "%" in path:  # (an API path has none: what it decodes to is never routed)
        return "encoded", []
    parts = path[len(PREFIX):].split("/")
    if not all(parts):
        return "", []
    if len(parts) == 1:
        return "buy", parts
    if len(parts) == 3 and parts[1] == "users":
        return "order", [parts[0], parts[2]]
    if len(parts) == 2 and parts[1] == "order":
        return "mine", parts[:1]
    if len(parts) == 2 and parts[1] == "waitlist":
        return "waitlist", parts[:1]
    return "", []


def _bounded(length: str | None) -> None:
    """BodyTooLarge for a declared Content-Length over MAX_BODY: refused before the
    work the body would be refused after."""
    if length is not None and (len(length) > 9 or not length.isdigit()
                               or int(length) > MAX_BODY):
        raise BodyTooLarge(f"body larger than {MAX_BODY} bytes")


def _unrouted(kind: str, path: str) -> HttpError:
    """Why a path has no route: percent-encoded (400) or unknown (404)."""
    if kind == "encoded":
        return HttpError(400, f"percent-encoded path, send it decoded: {_echo(path)}")
    return HttpError(404, f"no such path: {_echo(path)}")


def _iso(ms: int | None) -> str | None:
    """Unix milliseconds as ISO 8601 UTC."""
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _failed(endpoint: str, exc: Exception) -> Answer:
    """A failure's answer: its status (http_status_of), its message in JSON, and the
    headers that status asks for; outages and bugs are logged, never swallowed."""
    status = http_status_of(exc)
    if status == 401:
        return 401, _error(exc), _challenge(exc)
    if status == 408:
        return 408, _error("request body not received in time"), [("connection", "close")]
    if status == 429:
        retry = exc.retry_after if isinstance(exc, Overloaded) else 1
        return 429, _error(exc), [("retry-after", str(retry))]
    if status == 503:
        log.warning("service unavailable: %s", exc, extra={"event": "bff_unavailable"})
        return 503, _error(UNAVAILABLE.get(endpoint, str(exc))), []
    if status == 500:
        log.error("unexpected error on %s", endpoint, exc_info=exc,
                  extra={"event": "bff_error"})
        return 500, _error("internal error"), []
    return status, _error(exc), exc.headers if isinstance(exc, HttpError) else []


def _error(message: object) -> bytes:
    """An error body; its message cut to ERROR_CHARS, whatever of the input it quotes."""
    text = str(message)
    if len(text) > ERROR_CHARS:
        text = text[:ERROR_CHARS] + "..."
    return orjson.dumps({"error": text})


ERROR_CHARS = 400  # of an error message at most
ECHOED = 64  # characters of a client's input an error message repeats at most


def _echo(text: str) -> str:
    """A client's input as an error message quotes it: cut to ECHOED characters, so an
    answer never grows with what was sent."""
    return text if len(text) <= ECHOED else text[:ECHOED] + f"... ({len(text)} characters)"


def _identity(request: Request, body: bytes, caller: int | None) -> int:
    """Who acts: the token's user (a body's user_id must be the same), or without
    authentication the body's user_id."""
    body_uid = _user_id(request, body, required=caller is None)
    if caller is not None and body_uid is not None and body_uid != caller:
        raise Forbidden(f"user_id {body_uid} is not the token's user")
    user_id = caller if caller is not None else body_uid
    assert user_id is not None
    return user_id


def _too_early(outcome: str, result: GateResult | WaitlistResult) -> Answer:
    """429 with when to come back, or 425 with the sale's start: a purchase and a
    waitlist join are held back alike."""
    if outcome == "rate_limited":
        wait = max(1, -(-result.retry_after_ms // 1000))
        return 429, orjson.dumps({"status": outcome, "limit": result.limited_by,
                                  "retry_after_ms": result.retry_after_ms}), [
            ("retry-after", str(wait))]
    return 425, orjson.dumps({"status": outcome, "start": _iso(result.at_ms),
                              "start_ms": result.at_ms}), []


def _waitlist_answer(pid: int, result: WaitlistResult) -> Answer:
    """The answer to a waitlist join: the position, or why not (as a purchase would be
    refused, where the reasons are alike)."""
    outcome = result.outcome
    status = HTTP_STATUS_OF_WAITLIST[outcome]
    if outcome in ("joined", "waiting"):
        return status, orjson.dumps({"status": outcome, "state": WAITLISTED,
                                     "position": result.position}), []
    if outcome in ("rate_limited", "not_started"):
        return _too_early(outcome, result)
    message = WAITLIST_MESSAGES.get(outcome)
    if message is None:
        return status, orjson.dumps({"status": outcome}), []
    return status, orjson.dumps({"status": outcome, "message": message.format(
        product=pid, most=result.most)}), []


def _user_id(request: Request, body: bytes, *, required: bool) -> int | None:
    """The body's user_id: required without authentication, optional (an empty body)
    with it."""
    if not body and not required:
        return None
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise InvalidInput("expected Content-Type: application/json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("body is not valid JSON") from None
    if not isinstance(data, dict) or (required and "user_id" not in data):
        raise InvalidInput('expected a JSON object like {"user_id": 123}')
    return validate_id("user_id", data["user_id"]) if "user_id" in data else None


def load_keys(settings: Settings) -> KeySet:
    """The JWKS, loaded now: a BFF that would refuse every buyer does not start."""
    if not settings.bff_jwks:
        raise ConfigError("bff_auth = 'jwt' needs bff_jwks (a JWKS file or URL; "
                          "`seckill keys init` makes a development one), or set "
                          "bff_auth = 'none' to run without authentication")
    keyset = KeySet(settings)
    keyset.load()
    return keyset


def create_app() -> BffApp:
    """Granian's factory: each worker process builds its own app from the environment."""
    from engine.logs import setup_logging

    settings = load_settings()
    setup_logging(settings)
    return BffApp(settings)


def serve(settings: Settings, *, config: str | None = None, host: str | None = None,
          port: int | None = None, workers: int | None = None) -> int:
    """Run Granian with uvloop and `workers` processes; returns when it stops."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="seckill-bff-")
    if config:
        os.environ["SECKILL_CONFIG"] = config
    if settings.bff_auth == "jwt":
        load_keys(settings)  # refuse to start here, with one clear line, not in each worker
    else:
        log.warning(NO_AUTH_WARNING, extra={"event": "bff_no_auth"})
    ensure_replication(settings)  # gate_min_replicas: refuse to start without them
    from granian import Granian
    from granian.constants import Interfaces

    from engine.gate.admin import start_admin
    from engine.gate.verifiedtokens import shared_table

    start_admin(settings)
    with shared_table(settings.bff_token_cache if settings.bff_auth == "jwt" else 0):
        Granian("engine.gate.app:create_app", factory=True,
                interface=Interfaces(settings.bff_interface),
                address=host or settings.bff_host, port=port or settings.bff_port,
                workers=workers or settings.bff_workers or os.cpu_count() or 1,
                **granian_options(settings)).serve()
    return 0


def granian_options(settings: Settings) -> dict[str, Any]:
    """How Granian serves the BFF, bar the interface; bench/floor.py serves its floor
    with the same: uvloop, the header, keep-alive and buffer limits, the backlog."""
    from granian.constants import Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    http1 = HTTP1Settings(header_read_timeout=round(settings.bff_header_timeout * 1000),
                          keep_alive=settings.bff_keep_alive,
                          max_buffer_size=settings.bff_max_buffer)
    return {"loop": Loops.uvloop, "http1_settings": http1, "log_level": LogLevels.warning,
            "backlog": 2048}
