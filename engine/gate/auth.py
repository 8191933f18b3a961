"""Who is buying: a bearer JWT verified against the issuer's JWKS.

The algorithms come from the settings, never from the token: a token's `alg`
header only picks among them, and the key its `kid` names must be of that
algorithm's family, so `alg=none` and algorithm confusion (an RSA public key
used as an HMAC secret) are refused before any signature is checked.

A token's header and payload are parsed here, refusing a key written twice:
json.loads keeps the last of two `sub`s or `alg`s where another parser may keep
the first, and a token must mean one thing to every reader. Its lifetime is
capped (`bff_jwt_max_ttl`: a stolen token is not good for years), and its `sub`
must be the one decimal spelling of a user ID ("007" is not user 7).

A verified token is remembered per process under a hash of it (bounded, and
never past its `exp`), so a buyer who retries costs a dictionary lookup, not a
signature check. The cache forgets its oldest entry first, in constant time: a
sale with more buyers than the cache holds fills it with no attacker, and each
new token then must not pay for a scan of the whole cache.

Keys come from a JWKS file or URL; a URL is refreshed in the background, and
a token with an unknown `kid` causes at most one refresh per
`bff_jwks_min_refresh` seconds (a flood of made-up kids cannot hammer the
issuer).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.utils import base64url_decode

from engine.config import Settings, mask_url
from engine.errors import ConfigError, ServiceUnavailable, UsageError
from engine.gate.redis_gate import validate_id

log = logging.getLogger("seckill.bff.auth")

# the key type each configured algorithm must be verified with
KEY_TYPE = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP", "HS256": "oct"}
REQUIRED_CLAIMS = ["iss", "aud", "exp", "sub"]


class Unauthenticated(UsageError):
    """No token, or one that is malformed, expired, wrongly signed or not for us (401)."""


class Forbidden(UsageError):
    """A verified caller asking for what belongs to another user (403)."""


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    expires: float


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_jwks(source: str, timeout: float) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS file or URL by `kid`; a URL is fetched with `timeout`."""
    try:
        if is_url(source):
            with urllib.request.urlopen(source, timeout=timeout) as reply:  # noqa: S310
                data = json.loads(reply.read(1 << 20))
        else:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        keys = jwt.PyJWKSet.from_dict(data).keys
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        raise ServiceUnavailable(f"JWKS at {mask_url(source)}: {exc}") from exc
    if any("d" in k._jwk_data for k in keys):  # a private RSA, EC or OKP key
        log.warning("the JWKS at %s holds private key material", mask_url(source),
                    extra={"event": "bff_jwks_private"})
    return {str(k.key_id or ""): k for k in keys}


class KeySet:
    """The issuer's public keys, reloaded in the background when they come from a URL."""

    def __init__(self, settings: Settings) -> None:
        self.source = settings.bff_jwks
        self.timeout = settings.connect_timeout
        self.refresh_every = settings.bff_jwks_refresh
        self.min_refresh = settings.bff_jwks_min_refresh
        self.keys: dict[str, jwt.PyJWK] = {}
        self.loaded_at = float("-inf")
        self._refreshing: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Load now (at start): no usable key is a configuration error."""
        self.keys = read_jwks(self.source, self.timeout)
        self.loaded_at = time.monotonic()
        if not self.keys:
            raise ConfigError(f"bff_jwks: no usable key in {mask_url(self.source)}")

    async def refresh(self) -> None:
        """Reload once; concurrent callers share the one fetch."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            keys = await asyncio.to_thread(read_jwks, self.source, self.timeout)
            if keys:
                self.keys = keys
            self.loaded_at = time.monotonic()
        except ServiceUnavailable as exc:
            self.loaded_at = time.monotonic()  # a failed fetch also waits out min_refresh
            log.warning("JWKS refresh failed: %s", exc, extra={"event": "bff_jwks_failed"})
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    async def unknown_kid(self) -> None:
        """A token named a key we do not have: refresh, at most once per min_refresh."""
        if time.monotonic() - self.loaded_at >= self.min_refresh:
            await self.refresh()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Refresh a URL's keys in the background, on `loop` (default: the running one)."""
        if is_url(self.source) and self._task is None:
            loop = loop or asyncio.get_running_loop()
            self._task = loop.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            await self.refresh()


class Verifier:
    """Bearer token -> user ID, with a bounded per-process cache of verified tokens."""

    def __init__(self, settings: Settings, keyset: KeySet | None = None) -> None:
        self.algorithms = frozenset(settings.jwt_algorithms())
        self.issuer = settings.bff_jwt_issuer
        self.audience = settings.bff_jwt_audience
        self.keyset = keyset or KeySet(settings)
        self.max_ttl = settings.bff_jwt_max_ttl
        self.cache_size = settings.bff_token_cache
        self.cache: OrderedDict[bytes, Caller] = OrderedDict()
        self.decoder = _StrictJwt()
        # imported here, as the app does: the worker's prometheus mode is set by then
        from engine.metrics.bff import TOKENS

        self.verified, self.refused = TOKENS.labels("verified"), TOKENS.labels("refused")

    def cached(self, authorization: str | bytes | None) -> int | None:
        """The user ID of a token this process has verified and that has not expired:
        what a retrying buyer costs (a hash and a lookup, no coroutine); None when the
        token must go through `caller`."""
        try:
            digest = _digest(_bearer(authorization))
        except Unauthenticated:
            return None
        hit = self.cache.get(digest)
        if hit is not None and hit.expires > time.time():
            return hit.user_id
        return None

    async def caller(self, authorization: str | bytes | None) -> int:
        """The user ID of a valid `Authorization: Bearer` header, else Unauthenticated."""
        token = _bearer(authorization)
        digest = _digest(token)
        hit = self.cache.get(digest)
        if hit is not None:
            if hit.expires > time.time():
                return hit.user_id
            del self.cache[digest]
        try:
            caller = await self._verify(token)
        except Unauthenticated:
            self.refused.inc()
            raise
        self.verified.inc()
        self._remember(digest, caller)
        return caller.user_id

    def _remember(self, digest: bytes, caller: Caller) -> None:
        if not self.cache_size:
            return
        while len(self.cache) >= self.cache_size:
            self.cache.popitem(last=False)  # the oldest: a token expires or is retried soon
        self.cache[digest] = caller

    async def _verify(self, token: bytes) -> Caller:
        header = _header(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthenticated(f"algorithm {str(alg)[:20]!r} is not accepted")
        key = await self._key(header.get("kid"))
        if key.key_type != KEY_TYPE[alg] or key._jwk_data.get("alg", alg) != alg:
            raise Unauthenticated("the token's algorithm does not match its key")
        try:
            claims = self.decoder.decode(token, key.key, algorithms=[alg],
                                         audience=self.audience, issuer=self.issuer,
                                         options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        return Caller(_user_id(claims["sub"]), self._expiry(claims))

    def _expiry(self, claims: dict[str, Any]) -> float:
        """`exp`, once the token's lifetime is within bff_jwt_max_ttl. Compared before
        any arithmetic: an exp of 10**400 is a valid JSON integer that no float holds."""
        exp, iat = claims["exp"], claims.get("iat")
        if not _number(exp) or (iat is not None and not _number(iat)):
            raise Unauthenticated("exp and iat: expected numbers of seconds")
        if exp > time.time() + self.max_ttl or (iat is not None and exp - self.max_ttl > iat):
            raise Unauthenticated(f"token lifetime over {self.max_ttl:g} s is not accepted")
        return float(exp)

    async def _key(self, kid: Any) -> jwt.PyJWK:
        kid = "" if kid is None else str(kid)
        key = self._lookup(kid)
        if key is None:
            await self.keyset.unknown_kid()
            key = self._lookup(kid)
        if key is None:
            if not self.keyset.keys:
                raise ServiceUnavailable("no signing keys loaded from the JWKS")
            raise Unauthenticated(f"unknown key id {kid[:40]!r}")
        return key

    def _lookup(self, kid: str) -> jwt.PyJWK | None:
        keys = self.keyset.keys
        if not kid and len(keys) == 1:  # a single-key JWKS may leave kid out
            return next(iter(keys.values()))
        return keys.get(kid)


def _bearer(authorization: str | bytes | None) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (RSGI gives str, ASGI
    bytes), else Unauthenticated."""
    if not authorization:
        raise Unauthenticated("a bearer token is required")
    if isinstance(authorization, str):  # (RSGI: the usual "Bearer <token>" at once)
        try:
            if authorization.startswith("Bearer ") and authorization[7:8] not in (" ", ""):
                return authorization[7:].rstrip().encode("latin-1")
            authorization = authorization.encode("latin-1")
        except UnicodeEncodeError:
            raise Unauthenticated("malformed token") from None
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise Unauthenticated("expected Authorization: Bearer <token>")
    return token


class _StrictJwt(jwt.PyJWT):
    """PyJWT's checks, with the payload parsed once, by `_json_object`."""

    def _decode_payload(self, decoded: dict[str, Any]) -> dict[str, Any]:
        return _json_object(decoded["payload"], "payload")


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    """A token's header or payload: one JSON object whose keys each appear once."""
    try:  # (what _unique and _no_constant raise, a DecodeError, passes through)
        value = json.loads(raw, object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise jwt.DecodeError(f"the {part} is not JSON") from None
    if not isinstance(value, dict):
        raise jwt.DecodeError(f"the {part} is not a JSON object")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [k for k, _ in pairs]
        twice = next(k for k in out if names.count(k) > 1)
        raise jwt.DecodeError(f"key {twice[:40]!r} appears twice")
    return out


def _no_constant(name: str) -> None:
    raise jwt.DecodeError(f"{name} is not a number JSON allows")


def _header(token: bytes) -> dict[str, Any]:
    """The token's unverified header (PyJWT parses it again, strictly, to verify)."""
    try:
        return _json_object(base64url_decode(token.partition(b".")[0]), "header")
    except (ValueError, jwt.PyJWTError) as exc:  # (binascii.Error is a ValueError)
        raise Unauthenticated(f"malformed token: {exc}"[:120]) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _user_id(sub: Any) -> int:
    """The user ID a `sub` names, written as a positive decimal without leading zeros
    or signs: one user, one spelling."""
    if isinstance(sub, str) and sub.isascii() and sub.isdigit() and sub[0] != "0":
        try:
            return validate_id("sub", sub)
        except UsageError:
            pass
    raise Unauthenticated("sub: expected a positive 64-bit integer in decimal")


def _digest(token: bytes) -> bytes:
    """The cache's key: a hash, so the cache holds no usable token."""
    return hashlib.blake2b(token, digest_size=16).digest()
