"""`seckill bff`: the HTTP gate, a bare ASGI application served by Granian.

One gate call per purchase attempt and nothing else on the hot path: input
is validated before Redis is touched, a sale known to be sold out is
answered from memory for `bff_soldout_recheck` seconds, and past
`bff_max_inflight` concurrent requests a process answers 429 at once, so a
burst degrades into fast refusals instead of a queue of slow answers.

A client always gets JSON: a Redis or PostgreSQL failure is a 503 it may
retry, anything else a 500, and the error is logged, never swallowed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from engine.config import Settings, load_settings
from engine.connections import PG_ERRORS, connect_redis, create_pg_pool
from engine.errors import InvalidInput, ServiceUnavailable
from engine.gate.client import Gate, validate_id
from engine.keys import FAILED, Keys

log = logging.getLogger("seckill.bff")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 1024
BUY = re.compile(r"^/api/v1/seckill/([^/]+)$")
ORDER = re.compile(r"^/api/v1/seckill/([^/]+)/users/([^/]+)$")
STATUS_OF = {"accepted": 202, "duplicate": 409, "sold_out": 410, "no_sale": 404}
JSON = [(b"content-type", b"application/json")]
# what a failed or unreachable service raises, beyond our own ServiceUnavailable
REDIS_ERRORS = (RedisError, OSError, TimeoutError)
UNAVAILABLE = {"buy": "the gate is unavailable, try again",
               "order": "order state is unavailable, try again"}

LATEST_ORDER = """
SELECT status, instance_id, endpoint, reason, compensated_at FROM seckill_logs
WHERE product_id = $1 AND user_id = $2 ORDER BY id DESC LIMIT 1
"""


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BffApp:
    """The ASGI application of one process; connections are opened on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.gate: Gate | None = None
        self.pool: Any = None
        self.inflight = 0
        self.sold_out: dict[int, float] = {}
        from engine.metrics import bff as bffmetrics

        self.metrics = bffmetrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        endpoint, status, body = await self._dispatch(scope, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": self._headers(endpoint)})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe(endpoint, status, time.perf_counter() - started)

    def _headers(self, endpoint: str) -> list[tuple[bytes, bytes]]:
        if endpoint == "metrics":
            return [(b"content-type", self.metrics.CONTENT_TYPE.encode())]
        return JSON

    async def _dispatch(self, scope: Scope, receive: Receive) -> tuple[str, int, bytes]:
        path, method = scope["path"], scope["method"]
        buy, order = BUY.match(path), ORDER.match(path)
        endpoint = "buy" if buy else "order" if order else path.strip("/") or "other"
        if endpoint not in ("buy", "order", "healthz", "metrics"):
            endpoint = "other"
        try:
            if buy is not None:
                _allow(method, "POST")
                return endpoint, *await self._guarded(self.buy(buy.group(1), scope, receive))
            if order is not None:
                _allow(method, "GET")
                return endpoint, *await self.order(order.group(1), order.group(2))
            if endpoint == "healthz":
                return endpoint, 200, b'{"status":"ok"}'
            if endpoint == "metrics":
                return endpoint, 200, self.metrics.render()
            raise HttpError(404, f"no such path: {path}")
        except HttpError as exc:
            return endpoint, exc.status, _error(exc)
        except InvalidInput as exc:
            return endpoint, 400, _error(exc)
        except (ServiceUnavailable, *REDIS_ERRORS) as exc:
            log.warning("service unavailable: %s", exc, extra={"event": "bff_unavailable"})
            return endpoint, 503, _error(HttpError(503, UNAVAILABLE.get(endpoint, str(exc))))
        except Exception:  # noqa: BLE001 - a bug answers 500 in JSON, never a dropped request
            log.exception("unexpected error on %s", endpoint, extra={"event": "bff_error"})
            return endpoint, 500, _error(HttpError(500, "internal error"))

    async def _guarded(self, work: Awaitable[tuple[int, bytes]]) -> tuple[int, bytes]:
        cap = self.settings.bff_max_inflight
        if cap and self.inflight >= cap:
            work.close()  # type: ignore[attr-defined]
            raise HttpError(429, "too many requests in flight, try again")
        self.inflight += 1
        try:
            return await work
        finally:
            self.inflight -= 1

    async def buy(self, raw_pid: str, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        pid = validate_id("product_id", raw_pid)
        user_id = await _user_id(scope, receive)
        if self.sold_out.get(pid, 0.0) > time.monotonic():
            return 410, b'{"status":"sold_out"}'
        result = await (await self._gate()).buy(pid, user_id)
        if result.outcome == "sold_out":
            self.sold_out[pid] = time.monotonic() + self.settings.bff_soldout_recheck
        elif result.outcome == "accepted":
            return 202, orjson.dumps({"status": "accepted", "stream_id": result.stream_id,
                                      "slot": result.slot})
        return STATUS_OF[result.outcome], orjson.dumps({"status": result.outcome})

    async def order(self, raw_pid: str, raw_uid: str) -> tuple[int, bytes]:
        pid = validate_id("product_id", raw_pid)
        uid = validate_id("user_id", raw_uid)
        gate = await self._gate()
        pool = await self._pool()
        try:
            row = await pool.fetchrow(LATEST_ORDER, pid, uid, timeout=self.settings.db_timeout)
        except PG_ERRORS as exc:
            raise ServiceUnavailable(f"PostgreSQL: {exc}") from exc
        buyer = await gate.redis.sismember(self.keys.buyers(pid), str(uid))
        if row is None or (row["status"] == FAILED and row["compensated_at"] and buyer):
            if buyer:  # in the stream, not logged yet (or a new try after a failure)
                return 200, orjson.dumps({"state": "PENDING"})
            raise HttpError(404, f"user {uid} has no order for product {pid}")
        out: dict[str, Any] = {"state": row["status"], "instance_id": str(row["instance_id"])}
        if row["endpoint"]:
            out["endpoint"] = row["endpoint"]
        if row["reason"]:
            out["reason"] = row["reason"]
        return 200, orjson.dumps(out)

    async def _gate(self) -> Gate:
        if self.gate is None:
            redis = await connect_redis(self.settings, max_connections=1024)
            self.gate = Gate(redis, self.keys, coalesce=True)
        return self.gate

    async def _pool(self) -> Any:
        if self.pool is None:
            self.pool = await create_pg_pool(self.settings, size=2)
        return self.pool

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.gate is not None:
                    await self.gate.redis.aclose()
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"method {method} not allowed here; use {allowed}")


def _error(exc: Exception) -> bytes:
    return orjson.dumps({"error": str(exc)})


async def _user_id(scope: Scope, receive: Receive) -> int:
    headers = dict(scope.get("headers") or [])
    ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise InvalidInput("expected Content-Type: application/json")
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise InvalidInput(f"body larger than {MAX_BODY} bytes")
        if not message.get("more_body"):
            break
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("body is not valid JSON") from None
    if not isinstance(data, dict) or "user_id" not in data:
        raise InvalidInput('expected a JSON object like {"user_id": 123}')
    return validate_id("user_id", data["user_id"])


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
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    Granian("engine.gate.app:create_app", factory=True, interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            address=host or settings.bff_host, port=port or settings.bff_port,
            workers=workers or settings.bff_workers or os.cpu_count() or 1,
            log_level=LogLevels.warning, backlog=2048).serve()
    return 0
