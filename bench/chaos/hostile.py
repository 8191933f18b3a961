"""Hostile requests at the BFF (bad IDs, bodies and tokens, unknown routes) and hostile
publishers on the message bus.

`requests()` builds every request a real buyer never sends: IDs that are not positive
int64s (in the path and in the body), JSON that is not JSON or not the right shape,
bodies past the BFF's limit, tokens that are forged, expired, unsigned (alg=none), signed
HMAC with the public key, for another issuer or audience, with a `sub` that is not a
user ID; a body's user_id that is not the token's; order lookups of someone else's
order; paths and methods the BFF does not serve. None of them is a purchase: the
hostile users (`HOSTILE_USER` and up) never send a valid one, so a stream entry for
no accepted buyer is one written for a hostile request.

`hammer()` sends them over and over at full rate (`CONCURRENCY` at once) until told to
stop, and records each answer (status None: no answer at all) for the checker.

`forged_failures()` and `forged_orders()` are the bus attacks of issue 21, made during a
live sale by publishers that are not who the consumers trust: the broker's
administrator (what every client was before the components had users of their own),
without user-id or naming itself, and the other component's user. Each attack waits
until its forgeries were dead-lettered, then reads the ground truth; one that changed
anything fails its row (BusAttackError), and one applied early enough also shows as
oversold units on the board (a forged failure hands the victim's unit back to the sale).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiormq
import asyncpg
import httpx
import jwt

from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, login
from engine.amqp.topology import EXCHANGE, QUEUE_CREATED, RK_CREATED, RK_STATUS
from engine.pb import event_pb2
from engine.testing.invariants import Answer

HOSTILE_USER = 10**12  # hostile users' IDs; real buyers are 1..stock*1.1
CONCURRENCY = 16
BIG_ID = str(2**64)


@dataclass(frozen=True, slots=True)
class Request:
    """One hostile request: what it tries, and how it is sent."""

    what: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], key: bytes | None = None) -> str:
    """A JWT assembled by hand: alg=none (no key) or HS256 with `key` as the secret."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if key is None:
        return head + "."
    return head + "." + _b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


class Tokens:
    """Good and bad tokens of the run's development issuer (engine.gate.devkeys)."""

    def __init__(self, private_key: str, jwks: str, issuer: str, audience: str) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        data = json.loads(open(private_key, encoding="utf-8").read())
        self.key = jwt.PyJWK(data).key
        self.kid = str(data["kid"])
        self.public = open(jwks, "rb").read()
        self.iss, self.aud = issuer, audience
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def claims(self, sub: object, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"sub": str(sub), "iss": self.iss, "aud": self.aud, "iat": now,
                "exp": now + 900, **changes}

    def signed(self, claims: dict[str, Any], key: Any = None) -> str:
        return jwt.encode(claims, key or self.key, algorithm="RS256",
                          headers={"kid": self.kid})

    def bad(self, user: int) -> dict[str, str]:
        """Authorization headers that must all be refused, for `user`."""
        c = self.claims(user)
        bearer = {
            "expired": self.signed(self.claims(user, iat=int(time.time()) - 7200,
                                              exp=int(time.time()) - 3600)),
            "forged (another key, our kid)": self.signed(c, self.stranger),
            "alg=none": _unsigned({"alg": "none", "typ": "JWT", "kid": self.kid}, c),
            "HS256 with the public key": _unsigned({"alg": "HS256", "typ": "JWT",
                                                    "kid": self.kid}, c, self.public),
            "wrong issuer": self.signed(self.claims(user, iss="someone-else")),
            "wrong audience": self.signed(self.claims(user, aud="another-service")),
            "sub not a number": self.signed(self.claims("alice")),
            "sub negative": self.signed(self.claims(-1)),
            "sub zero": self.signed(self.claims(0)),
            "sub > int64": self.signed(self.claims(BIG_ID)),
            "sub of 300 digits": self.signed(self.claims("9" * 300)),
            "no exp": self.signed({k: v for k, v in c.items() if k != "exp"}),
            "garbage": "x.y.z",
            "10 kB of garbage": "a" * 10_000,
            "signature cut": self.signed(c)[:-10],
        }
        out = {name: f"Bearer {token}" for name, token in bearer.items()}
        out["Basic auth"] = "Basic " + _b64(b"admin:admin")
        out["scheme alone"] = "Bearer"
        return out


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def requests(pid: int, buyer: int, tokens: Tokens) -> list[Request]:
    """Every hostile request against the sale of `pid`; `buyer` is a real buyer's ID
    (whose order a hostile user tries to buy for or read)."""
    user = HOSTILE_USER + 1
    good = {"authorization": f"Bearer {tokens.signed(tokens.claims(user))}"}
    js = {**good, "content-type": "application/json"}
    buy = f"/api/v1/seckill/{pid}"
    out: list[Request] = []
    for raw in ("abc", "-1", "0", str(2**63), BIG_ID, "9" * 300, "1.5", "1e3", "0x1f",
                "%D9%A1%D9%A2", "null", "%00", "1;DROP TABLE seckill_logs"):
        out.append(Request(f"path ID {raw[:12]!r}", "POST", f"/api/v1/seckill/{raw}", js,
                           _json({"user_id": user})))
        out.append(Request(f"order path ID {raw[:12]!r}", "GET",
                           f"/api/v1/seckill/{raw}/users/{raw}", good))
    bodies: dict[str, bytes] = {
        "body user_id != sub": _json({"user_id": buyer}),
        "body user_id string": _json({"user_id": "abc"}),
        "body user_id negative": _json({"user_id": -5}),
        "body user_id zero": _json({"user_id": 0}),
        "body user_id > int64": _json({"user_id": 2**64}),
        "body user_id of 300 digits": b'{"user_id": ' + b"9" * 300 + b"}",
        "body user_id float": _json({"user_id": 1.5}),
        "body user_id null": _json({"user_id": None}),
        "body user_id list": _json({"user_id": [user]}),
        "body user_id object": _json({"user_id": {"id": user}}),
        "body user_id true": _json({"user_id": True}),
        "body a list": _json([user]),
        "body a string": _json("buy"),
        "bad JSON": b'{"user_id": ',
        "not JSON": b"user_id=1",
        "trailing comma": b'{"user_id": 1,}',
        "invalid UTF-8": b'{"user_id": "\xff\xfe"}',
        "nested 10,000 deep": b"[" * 10_000 + b"]" * 10_000,
        "oversized 2 kB": _json({"user_id": user, "pad": "x" * 2_000}),
        "oversized 64 kB": _json({"user_id": user, "pad": "x" * 64_000}),
        "oversized 1 MB": _json({"user_id": user, "pad": "x" * 1_000_000}),
    }
    out += [Request(what, "POST", buy, js, body) for what, body in bodies.items()]
    out.append(Request("JSON body as text/plain", "POST", buy,
                       {**good, "content-type": "text/plain"}, _json({"user_id": user})))
    for what, auth in tokens.bad(user).items():
        headers = {"authorization": auth, "content-type": "application/json"}
        out.append(Request(f"token {what}: buy", "POST", buy, headers, _json({"user_id": user})))
        out.append(Request(f"token {what}: own order", "GET", f"{buy}/order",
                           {"authorization": auth}))
    out += [
        Request("no token: buy", "POST", buy, {"content-type": "application/json"},
                _json({"user_id": user})),
        Request("no token: order", "GET", f"{buy}/users/{buyer}", {}),
        Request("another user's order", "GET", f"{buy}/users/{buyer}", good),
    ]
    for method, path in (("GET", "/"), ("GET", "/admin"), ("GET", "/metrics"),
                         ("GET", "/api/v1/seckill"), ("POST", "/api/v1/seckill/"),
                         ("POST", f"{buy}/1/2/3"), ("GET", "/../../etc/passwd"),
                         ("POST", "/healthz"), ("DELETE", buy), ("PUT", buy),
                         ("PATCH", buy), ("OPTIONS", buy), ("POST", f"{buy}/order"),
                         ("GET", "/" + "a" * 4000)):
        out.append(Request(f"route {method} {path[:30]}", method, path, js,
                           _json({"user_id": user})))
    return out


async def hammer(url: str, hostile: list[Request], stop: asyncio.Event,
                 answers: list[Answer], concurrency: int = CONCURRENCY) -> None:
    """Send the hostile requests round and round, `concurrency` at once, until `stop`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        async def one(lane: int) -> None:
            for request in _rounds(hostile, lane, concurrency):
                if stop.is_set():
                    return
                answers.append(Answer("hostile", request.what,
                                      await _send(client, request)))

        await asyncio.gather(*(one(lane) for lane in range(concurrency)))


def _rounds(hostile: list[Request], lane: int, lanes: int) -> Iterator[Request]:
    """Lane `lane`'s share of the list, over and over."""
    while True:
        yield from hostile[lane::lanes]


async def _send(client: httpx.AsyncClient, request: Request) -> int | None:
    """The status the BFF answered, or None when it gave no answer."""
    try:
        reply = await client.request(request.method, request.path, headers=request.headers,
                                     content=request.body)
    except httpx.LocalProtocolError:
        raise  # httpx would not send it: the request is ours to fix, not the BFF's fault
    except httpx.HTTPError:
        return None
    return reply.status_code


# -- the message bus ----------------------------------------------------------------
BUS_VICTIMS = 50  # buyers whose instances the forged reports name
FORGED_ORDERS = 20  # forged INSTANCE_CREATED events
BUS_WAIT_S = 60.0


async def _eavesdrop(amqp_url: str, product_id: int, count: int,
                     timeout: float) -> list[event_pb2.Event]:
    """What the attacker did first: a queue of its own bound to the exchange with '#',
    reading every INSTANCE_CREATED of the sale (instance, user, product)."""
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        queue = (await channel.queue_declare("", exclusive=True, auto_delete=True)).queue
        await channel.queue_bind(queue, EXCHANGE, routing_key="#")
        seen: list[event_pb2.Event] = []
        enough = asyncio.Event()

        async def on_message(message: Any) -> None:
            event = event_pb2.Event.FromString(message.body)
            if event.event_type == event_pb2.INSTANCE_CREATED and event.product_id == product_id:
                seen.append(event)
                if len(seen) >= count:
                    enough.set()

        await channel.basic_consume(queue, on_message, no_ack=True)
        try:
            await asyncio.wait_for(enough.wait(), timeout)
        except TimeoutError:
            pass
        return seen[:count]
    finally:
        await conn.close()


async def _publish(url: str, bodies: list[bytes], exchange: str, routing_key: str,
                   user_id: str | None) -> str:
    """Publish each body with confirms on `url`'s login; '' or what the broker refused."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        for body in bodies:
            await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                        properties=aiormq.spec.Basic.Properties(
                                            user_id=user_id, delivery_mode=2))
        return ""
    except aiormq.exceptions.AMQPError as exc:
        return str(exc)
    finally:
        await conn.close()


class BusAttackError(Exception):
    """A bus attack changed what it must not, or could not be made: its row fails."""


async def _waited(check: Any, what: str) -> str:
    """'' once `check()` holds within BUS_WAIT_S, else why not: the ground truth is read
    either way. (Not runner.wait_until: the runner imports this module through bff.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUS_WAIT_S
    while not await check():
        if loop.time() > deadline:
            return f"timed out after {BUS_WAIT_S:.0f}s waiting for {what}"
        await asyncio.sleep(0.2)
    return ""


def _administrator(sale: Any) -> str:
    from urllib.parse import urlsplit

    return urlsplit(sale.settings.amqp_url).username or "guest"


async def _dead_letters(sale: Any, reason: bytes) -> int:
    entries = await sale.redis.xrange(sale.keys.status_dlq)
    return sum(1 for _, fields in entries if fields.get(b"reason") == reason)


async def forged_failures(sale: Any) -> None:
    """INSTANCE_FAILED for buyers' instances, their user and product right (read off the
    bus), from every publisher but the Resource Domain's user: none may fail an order.

    Only a PROCESSING order can fail, and the reference Resource Domain reports within
    milliseconds, so it is stopped meanwhile: the window the attack needs (an order not
    yet provisioned) is the whole attack, and restarted, it provisions every order.
    """
    assert sale.resource_domain is not None
    await asyncio.to_thread(sale.resource_domain.stop)
    try:
        await _forge_failures(sale)
    finally:
        sale.start_resource_domain()


async def _forge_failures(sale: Any) -> None:
    settings, admin = sale.settings, _administrator(sale)
    victims = await _eavesdrop(settings.amqp_url, sale.product_id, BUS_VICTIMS, 30)
    if not victims:
        raise BusAttackError("the eavesdropper saw no INSTANCE_CREATED of the sale")
    bodies = [event_pb2.Event(
        event_type=event_pb2.INSTANCE_FAILED, instance_id=e.instance_id, user_id=e.user_id,
        product_id=e.product_id, stream_id=e.stream_id, sale_id=e.sale_id, slot=e.slot,
        reason="forged", timestamp=e.timestamp).SerializeToString() for e in victims]
    before = await _dead_letters(sale, b"untrusted_sender")
    for user_id in (None, admin):
        refused = await _publish(settings.amqp_url, bodies, EXCHANGE, RK_STATUS, user_id)
        if refused:
            raise BusAttackError(f"the broker refused the administrator's forgeries: {refused}")
    engine = login(settings, ENGINE)  # the wrong component: the broker itself refuses it
    by_engine = await _publish(engine.url, bodies[:1], EXCHANGE, RK_STATUS, engine.user)
    if "ACCESS_REFUSED" not in by_engine:
        raise BusAttackError(f"the engine's broker user could publish a status report: "
                         f"{by_engine or 'accepted'}")
    sent = 2 * len(bodies)

    async def refused_all() -> bool:
        return await _dead_letters(sale, b"untrusted_sender") - before >= sent

    unrefused = await _waited(refused_all, "the forged reports dead-lettered")
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        failed = await conn.fetchval(
            "SELECT count(*) FROM seckill_logs WHERE instance_id = ANY($1::bigint[]) AND "
            "(status = 'FAILED' OR compensated_at IS NOT NULL)", [e.instance_id for e in victims])
    finally:
        await conn.close()
    sale.notes.append(f"{sent} forged INSTANCE_FAILED for {len(victims)} buyers' instances "
                      f"(as {admin}, with and without user-id) dead-lettered; the engine's "
                      "user refused instance.status by the broker")
    if failed or unrefused:
        raise BusAttackError(f"forged reports failed {failed} of {len(victims)} victims' orders"
                         f"{'; ' + unrefused if unrefused else ''}")


def miner(instance_id: int, product_id: int) -> event_pb2.Event:
    """The forged order of issue 21: a user with no order, a miner image, 96 CPUs, an H100."""
    return event_pb2.Event(
        event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id,
        user_id=HOSTILE_USER, product_id=product_id, name="free GPU", timestamp=int(time.time()),
        spec=event_pb2.InstanceSpec(cpus=96, memory_mb=1 << 20, gpu="H100",
                                    image="attacker.example/miner:latest"))


async def forged_orders(sale: Any) -> None:
    """INSTANCE_CREATED for instances nobody bought, straight into the Resource Domain's
    queue (the default exchange: the scoreboard's tap on the exchange would count them as
    unexpected events, whether provisioned or not), from every publisher but the engine's
    user: none may be provisioned."""
    settings, admin = sale.settings, _administrator(sale)
    first = int(time.time() * 1000) << 22 | 0x3FFFFF  # no snowflake the engine makes
    ids = [first - i for i in range(FORGED_ORDERS)]
    bodies = [miner(i, sale.product_id).SerializeToString() for i in ids]
    for user_id in (None, admin):
        refused = await _publish(settings.amqp_url, bodies, "", QUEUE_CREATED, user_id)
        if refused:
            raise BusAttackError(f"the broker refused the administrator's forgeries: {refused}")
    rd = login(settings, RESOURCE_DOMAIN)  # the wrong component: refused by the broker
    by_rd = await _publish(rd.url, bodies[:1], EXCHANGE, RK_CREATED, rd.user)
    if "ACCESS_REFUSED" not in by_rd:
        raise BusAttackError(f"the Resource Domain's user could order an instance: "
                         f"{by_rd or 'accepted'}")
    conn = await asyncpg.connect(settings.pg_dsn, timeout=10)
    try:
        async def refused_all() -> bool:
            kept = await conn.fetchval(
                "SELECT count(*) FROM resource_domain.dead_letters WHERE body = ANY($1)",
                bodies)
            return kept >= 2 * len(bodies)

        unrefused = await _waited(refused_all, "the forged orders dead-lettered")
        provisioned = await conn.fetchval(
            "SELECT count(*) FROM resource_domain.instances WHERE instance_id = ANY($1)", ids)
    finally:
        await conn.close()
    sale.notes.append(f"{2 * len(bodies)} forged INSTANCE_CREATED (miner image, 96 CPUs, H100;"
                      f" as {admin}, with and without user-id) kept in "
                      "resource_domain.dead_letters; the Resource Domain's user refused "
                      "instance.created by the broker")
    if provisioned or unrefused:
        raise BusAttackError(f"{provisioned} of {len(ids)} forged instances provisioned"
                         f"{'; ' + unrefused if unrefused else ''}")
