"""Hostile requests at the BFF: bad IDs, bodies and tokens, unknown routes.

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

import httpx
import jwt

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
