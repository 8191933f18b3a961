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
signature check; in a BFF of several worker processes it is also written to a
table they share (engine.gate.verifiedtokens), so a token verified when the
sale page loaded is known to whichever worker takes the purchase. The cache
forgets its oldest entry first, in constant time: a sale with more buyers than
the cache holds fills it with no attacker, and each new token then must not pay
for a scan of the whole cache.

The signature is checked here, with the algorithm the setting allows, over the
segments parsed once (strict base64url, one JSON object each); the payload is
parsed only once the signature holds, then the claims PyJWT would check are
checked (iss, aud, exp, nbf, iat, jti). PyJWT's decode parsed the header again
and checked each byte of the token against the base64url alphabet in Python: a
new token cost about three RSA verifications, most of it not the signature.

Keys come from a JWKS file or URL; a URL is refreshed in the background, and
a token with an unknown `kid` causes at most one refresh per
`bff_jwks_min_refresh` seconds (a flood of made-up kids cannot hammer the
issuer).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import re
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from engine.config import Settings, mask_url
from engine.errors import ConfigError, ServiceUnavailable, UsageError
from engine.gate.redis_gate import validate_id
from engine.gate.verifiedtokens import VerifiedTokens

log = logging.getLogger("seckill.bff.auth")

# the key type each configured algorithm must be verified with
KEY_TYPE = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP", "HS256": "oct"}
REQUIRED_CLAIMS = ["iss", "aud", "exp", "sub"]
ALGORITHMS = {name: get_default_algorithms()[name] for name in KEY_TYPE}
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*={0,2}")


class Unauthenticated(UsageError):
    """No token, or one that is malformed, expired, wrongly signed or not for us (401)."""


class Malformed(Exception):
    """A token segment that is not strict base64url or not one JSON object (inside this
    module: the caller sees Unauthenticated)."""


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
        # what the BFF's other workers verified (None outside a multi-process BFF)
        self.shared = _attach_shared() if self.cache_size else None
        self.prepared: dict[int, tuple[jwt.PyJWK, str, Any]] = {}
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
        return None  # (the shared table is `caller`'s: a new token looks there once)

    def _shared(self, digest: bytes) -> int | None:
        """A token another worker verified: remembered here too, and its user ID."""
        if self.shared is None:
            return None
        found = self.shared.get(digest)
        if found is None:
            return None
        self._remember(digest, Caller(*found), share=False)
        return found[0]

    async def caller(self, authorization: str | bytes | None) -> int:
        """The user ID of a valid `Authorization: Bearer` header, else Unauthenticated."""
        token = _bearer(authorization)
        digest = _digest(token)
        hit = self.cache.get(digest)
        if hit is not None:
            if hit.expires > time.time():
                return hit.user_id
            del self.cache[digest]
        user_id = self._shared(digest)
        if user_id is not None:
            return user_id
        try:
            caller = await self._verify(token)
        except Unauthenticated:
            self.refused.inc()
            raise
        self.verified.inc()
        self._remember(digest, caller)
        return caller.user_id

    def _remember(self, digest: bytes, caller: Caller, *, share: bool = True) -> None:
        if not self.cache_size:
            return
        while len(self.cache) >= self.cache_size:
            self.cache.popitem(last=False)  # the oldest: a token expires or is retried soon
        self.cache[digest] = caller
        if share and self.shared is not None:
            self.shared.put(digest, caller.user_id, caller.expires)

    async def _verify(self, token: bytes) -> Caller:
        """Header, key, signature, then claims: the payload is parsed only once the
        signature holds, and every segment is decoded once (PyJWT decoded and parsed
        the header again, and checked the base64 alphabet a byte at a time in Python:
        most of what a new token cost beyond the signature itself)."""
        signing_input, header, signature = _segments(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthenticated(f"algorithm {str(alg)[:20]!r} is not accepted")
        if "crit" in header or header.get("b64", True) is not True:
            raise Unauthenticated("critical header extensions are not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("the key id (kid) must be a string")
        key = await self._key(kid)
        if key.key_type != KEY_TYPE[alg] or key._jwk_data.get("alg", alg) != alg:
            raise Unauthenticated("the token's algorithm does not match its key")
        algorithm = ALGORITHMS[alg]
        try:
            valid = algorithm.verify(signing_input, self._prepared(key, alg), signature)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthenticated(f"invalid token: {exc}"[:120]) from None
        if not valid:
            raise Unauthenticated("invalid token: signature verification failed")
        claims = _claims(signing_input)
        self._check_claims(claims)
        return Caller(_user_id(claims["sub"]), self._expiry(claims))

    def _prepared(self, key: jwt.PyJWK, alg: str) -> Any:
        """The key as `alg` verifies with it, checked once per key (PyJWT checks its type
        against each key class on every decode)."""
        entry = self.prepared.get(id(key))
        if entry is None or entry[0] is not key or entry[1] != alg:
            if len(self.prepared) >= 64:  # keys refreshed many times: start again
                self.prepared.clear()
            entry = self.prepared[id(key)] = (key, alg, ALGORITHMS[alg].prepare_key(key.key))
        return entry[2]

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """What PyJWT checked for us: the required claims, who issued the token and for
        whom, and that it is already and still valid (no leeway)."""
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise Unauthenticated(f'invalid token: token is missing the "{name}" claim')
        now = time.time()
        times = [claims[name] for name in ("exp", "iat", "nbf") if name in claims]
        if not all(_number(value) for value in times):
            raise Unauthenticated("exp, iat and nbf: expected numbers of seconds")
        if claims["exp"] <= now:
            raise Unauthenticated("token expired")
        if claims.get("iat", now) > now or claims.get("nbf", now) > now:
            raise Unauthenticated("invalid token: the token is not yet valid")
        if claims["iss"] != self.issuer:
            raise Unauthenticated("invalid token: invalid issuer")
        audience = claims["aud"]
        if isinstance(audience, str):
            audience = [audience]
        if not isinstance(audience, list) or not all(isinstance(a, str) for a in audience):
            raise Unauthenticated("invalid token: invalid claim format in token (aud)")
        if self.audience not in audience:
            raise Unauthenticated("invalid token: audience doesn't match")
        if not isinstance(claims.get("jti", ""), str):
            raise Unauthenticated("invalid token: JWT ID (jti) must be a string")

    def _expiry(self, claims: dict[str, Any]) -> float:
        """`exp`, once the token's lifetime is within bff_jwt_max_ttl. Compared before
        any arithmetic: an exp of 10**400 is a valid JSON integer that no float holds."""
        exp, iat = claims["exp"], claims.get("iat")  # (numbers: _check_claims saw to it)
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


def _attach_shared() -> VerifiedTokens | None:
    """The BFF's shared table; a table that is gone or not private to us is not used (a
    warning, and this worker verifies what it has not seen itself: slower, never
    wrong)."""
    try:
        return VerifiedTokens.attach()
    except OSError as exc:
        log.warning("verified-token table not used: %s", exc,
                    extra={"event": "bff_token_table_unusable"})
        return None


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


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    """A token's header or payload: one JSON object whose keys each appear once."""
    try:  # (what _unique and _no_constant raise, a Malformed, passes through)
        value = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise Malformed(f"the {part} is not JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"the {part} is not a JSON object")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [k for k, _ in pairs]
        twice = next(k for k in out if names.count(k) > 1)
        raise Malformed(f"key {twice[:40]!r} appears twice")
    return out


def _no_constant(name: str) -> None:
    raise Malformed(f"{name} is not a number JSON allows")


def _segments(token: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    """(signing input, header, signature) of a compact JWS, each segment strictly
    base64url: a byte outside the alphabet is refused, not skipped, so one token has
    one reading."""
    try:
        signing_input, _, signature = token.rpartition(b".")
        head, dot, payload = signing_input.partition(b".")
        if not dot or b"." in payload:
            raise Malformed("expected three dot-separated segments")
        return (signing_input, _json_object(_base64url(head, "header"), "header"),
                _base64url(signature, "signature"))
    except Malformed as exc:
        raise Unauthenticated(f"malformed token: {exc}"[:120]) from None


def _claims(signing_input: bytes) -> dict[str, Any]:
    """The payload of a token whose signature holds."""
    try:
        payload = signing_input.partition(b".")[2]
        return _json_object(_base64url(payload, "payload"), "payload")
    except Malformed as exc:
        raise Unauthenticated(f"invalid token: {exc}"[:120]) from None


def _base64url(segment: bytes, part: str) -> bytes:
    """A segment's bytes; trailing `=` padding is taken (some issuers write it), as
    PyJWT takes it."""
    stripped = segment.rstrip(b"=")
    if (not _BASE64URL.fullmatch(segment) or len(stripped) % 4 == 1
            or (stripped != segment and len(segment) % 4)):
        raise Malformed(f"the {part} is not base64url")
    return binascii.a2b_base64(stripped.translate(_STANDARD) + b"=" * (-len(stripped) % 4))


# built once: json.loads with a hook builds a decoder per call
_JSON = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant)
_STANDARD = bytes.maketrans(b"-_", b"+/")


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
