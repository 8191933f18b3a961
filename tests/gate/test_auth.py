"""Identity at the gate: bearer JWTs against the real BFF, Redis and PostgreSQL.

Every refused token must leave the order stream as it was; the JWKS comes from
a file or from a URL served here; the verified-token cache is tested on the
verifier itself, where time and keys can be changed under it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwtissuer import Issuer

from engine.config import Settings
from engine.gate.auth import KeySet, Unauthenticated, Verifier
from engine.testing.bff import Bff
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, engine_env
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["rsgi", "asgi"])
def jwt_bff(auth_settings, request):
    """A BFF that takes bearer tokens of `issuer` only (test_bff.py's `bff` takes none)."""
    server = Bff(auth_settings, bff_interface=request.param)
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def bad_tokens(issuer: Issuer, tmp_path: Path) -> dict[str, dict[str, str]]:
    """Every way a token must be refused, as request headers."""
    other = Issuer(tmp_path / "other", Settings())  # a key the BFF does not know
    public_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    good = issuer.claims(5)
    return {
        "missing": {},
        "not bearer": {"authorization": "Basic dXNlcjpwdw=="},
        "malformed": bearer("not.a.token"),
        "forged": bearer(issuer.signed(good, key=other.key)),  # our kid, their signature
        "expired": bearer(issuer.signed(issuer.claims(5, exp=int(time.time()) - 60))),
        "alg none": bearer(jwt.encode(good, None, algorithm="none",
                                      headers={"kid": issuer.kid})),
        "wrong aud": bearer(issuer.signed(issuer.claims(5, aud="someone-else"))),
        "wrong iss": bearer(issuer.signed(issuer.claims(5, iss="https://evil"))),
        # algorithm confusion: the public key used as an HMAC secret
        "HS256 with the public key": bearer(_hs256(good, public_pem, issuer.kid)),
        "unknown kid": bearer(issuer.signed(good, key=other.key, kid=other.kid)),
        "no sub": bearer(issuer.signed({k: v for k, v in good.items() if k != "sub"})),
        "sub not an ID": bearer(issuer.signed(issuer.claims(5, sub="alice"))),
        "no exp": bearer(issuer.signed({k: v for k, v in good.items() if k != "exp"})),
    }


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """What PyJWT itself refuses to make (a PEM as HMAC key): signed by hand."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


async def test_every_bad_token_is_401_and_writes_nothing(jwt_bff, gate, issuer, tmp_path,
                                                         product_id):
    await gate.open_sale(product_id, 5)
    stream = gate.keys.stream(product_id)
    async with httpx.AsyncClient(base_url=jwt_bff.url) as client:
        for name, headers in bad_tokens(issuer, tmp_path).items():
            r = await client.post(f"/api/v1/seckill/{product_id}", headers=headers)
            assert r.status_code == 401, (name, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="seckill"'), name
            r = await client.get(f"/api/v1/seckill/{product_id}/users/5", headers=headers)
            assert r.status_code == 401, (name, r.text)
        assert await gate.redis.xlen(stream) == 0
        assert (await gate.sale_state(product_id)).stock == 5
        # and the same server takes a good token: the refusals were about the tokens
        r = await client.post(f"/api/v1/seckill/{product_id}", headers=bearer(issuer.token(5)))
        assert r.status_code == 202, r.text
    assert await gate.redis.xlen(stream) == 1


async def test_the_token_names_the_buyer(jwt_bff, gate, issuer, product_id):
    await gate.open_sale(product_id, 5)
    buy = f"/api/v1/seckill/{product_id}"
    async with httpx.AsyncClient(base_url=jwt_bff.url) as client:
        me = bearer(issuer.token(7))
        r = await client.post(buy, headers=me, json={"user_id": 8})
        assert r.status_code == 403 and "not the token's user" in r.json()["error"]
        assert await gate.redis.xlen(gate.keys.stream(product_id)) == 0
        assert (await client.post(buy, headers=me)).status_code == 202  # no body at all
        assert (await client.post(buy, headers=me, json={"user_id": 7})).status_code == 409
        assert (await client.post(buy, headers=me, json={})).status_code == 409
    entries = await gate.redis.xrange(gate.keys.stream(product_id))
    assert [e[1][b"uid"] for e in entries] == [b"7"]


async def test_a_known_sold_out_sale_is_410_before_any_token_check(auth_settings, gate, issuer,
                                                                    tmp_path, product_id):
    """Past the sold-out moment a process answers from memory before it checks a token
    or reads a body: the answer is the same for anyone (and public), and a signature
    check for it would cost more than the rest of the attempt. No token at all is still
    401."""
    server = Bff(auth_settings, bff_soldout_recheck=60.0)
    try:
        await gate.open_sale(product_id, 1)
        buy = f"/api/v1/seckill/{product_id}"
        async with httpx.AsyncClient(base_url=server.url) as client:  # one connection
            assert (await client.post(buy, headers=bearer(issuer.token(1)))).status_code == 202
            assert (await client.post(buy, headers=bearer(issuer.token(2)))).status_code == 410
            forged = bad_tokens(issuer, tmp_path)["forged"]
            r = await client.post(buy, headers=forged, json={"user_id": 99})
            assert (r.status_code, r.json()) == (410, {"status": "sold_out"})
            r = await client.post(buy)
            assert r.status_code == 401 and "www-authenticate" in r.headers
    finally:
        server.stop()
    assert await gate.redis.xlen(gate.keys.stream(product_id)) == 1


async def test_orders_only_for_their_owner(jwt_bff, gate, issuer, product_id):
    await gate.open_sale(product_id, 5)
    async with httpx.AsyncClient(base_url=jwt_bff.url) as client:
        alice, bob = bearer(issuer.token(21)), bearer(issuer.token(22))
        assert (await client.post(f"/api/v1/seckill/{product_id}", headers=alice)
                ).status_code == 202
        r = await client.get(f"/api/v1/seckill/{product_id}/users/21", headers=bob)
        assert r.status_code == 403
        r = await client.get(f"/api/v1/seckill/{product_id}/users/21", headers=alice)
        assert (r.status_code, r.json()) == (200, {"state": "PENDING"})
        r = await client.get(f"/api/v1/seckill/{product_id}/order", headers=alice)
        assert (r.status_code, r.json()) == (200, {"state": "PENDING"})
        r = await client.get(f"/api/v1/seckill/{product_id}/order", headers=bob)
        assert r.status_code == 404  # bob's own order: he has none
        r = await client.get(f"/api/v1/seckill/{product_id}/order")
        assert r.status_code == 401


def test_refuses_to_start_without_keys(settings):
    port = free_port()
    done = subprocess.run([SECKILL, "bff", "--port", str(port), "--workers", "1"],
                          env=engine_env(settings, bff_auth="jwt", bff_jwks=""),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bff_auth = 'jwt' needs bff_jwks" in done.stderr


async def test_without_auth_healthz_says_so(settings):
    server = Bff(settings.replace(bff_auth="none"))
    try:
        health = httpx.get(server.url + "/healthz").json()
    finally:
        server.stop()
    assert health["auth"] == "none" and "anyone can buy" in health["warning"]


def test_token_command_mints_what_the_bff_accepts(tmp_path, settings):
    keydir = tmp_path / "k"
    done = subprocess.run([SECKILL, "keys", "init", "--dir", str(keydir)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    private = keydir / "private" / "signing-key.json"
    assert (private.parent.stat().st_mode & 0o777, private.stat().st_mode & 0o777) == (
        0o700, 0o600)
    assert "d" not in json.loads((keydir / "jwks.json").read_text())["keys"][0]
    done = subprocess.run([SECKILL, "token", "--user", "99", "--ttl", "2m", "--key",
                           str(private)], capture_output=True, text=True, timeout=60,
                          env=engine_env(settings))
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), options={"verify_signature": False})
    assert claims["sub"] == "99" and 110 <= claims["exp"] - claims["iat"] <= 120


# -- the verifier itself: keys from a URL, the cache -----------------------------------


class JwksServer:
    """A JWKS URL whose keys a test swaps, counting the fetches."""

    def __init__(self, jwks: dict[str, object]) -> None:
        self.jwks, self.fetches = jwks, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.fetches += 1
                body = json.dumps(owner.jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_unknown_kid_refreshes_a_url_once_per_interval(tmp_path, settings):
    first, second = Issuer(tmp_path / "a", settings), Issuer(tmp_path / "b", settings)
    server = JwksServer(json.loads(first.jwks.read_text()))
    try:
        s = settings.replace(bff_jwks=server.url, bff_jwks_min_refresh=30.0)
        keyset = KeySet(s)
        keyset.load()
        verifier = Verifier(s, keyset)
        assert await verifier.caller(f"Bearer {first.token(1)}".encode()) == 1
        # the issuer rotates to a new key: the first token with its kid refreshes the set
        server.jwks = json.loads(second.jwks.read_text())
        keyset.loaded_at -= 60  # the last load was long ago
        assert await verifier.caller(f"Bearer {second.token(2)}".encode()) == 2
        assert server.fetches == 2
        # made-up kids cannot make us fetch again within the interval
        for n in range(5):
            token = first.signed(first.claims(3), kid=f"made-up-{n}")
            with pytest.raises(Unauthenticated, match="unknown key id"):
                await verifier.caller(f"Bearer {token}".encode())
        assert server.fetches == 2
    finally:
        server.close()


async def test_background_refresh_of_a_url(tmp_path, settings):
    first, second = Issuer(tmp_path / "a", settings), Issuer(tmp_path / "b", settings)
    server = JwksServer(json.loads(first.jwks.read_text()))
    try:
        keyset = KeySet(settings.replace(bff_jwks=server.url, bff_jwks_refresh=0.2))
        keyset.load()
        keyset.start()
        server.jwks = json.loads(second.jwks.read_text())
        async def refreshed() -> bool:
            return second.kid in keyset.keys

        await wait_for(refreshed, 20, "the key set refreshed", interval=0.05)
        await keyset.stop()
    finally:
        server.close()


async def test_cached_tokens_skip_the_signature_but_never_outlive_exp(issuer, settings):
    keyset = KeySet(settings.replace(bff_jwks=str(issuer.jwks)))
    keyset.load()
    verifier = Verifier(settings.replace(bff_token_cache=2), keyset)
    short = f"Bearer {issuer.token(1, ttl=2)}".encode()
    assert await verifier.caller(short) == 1
    saved, keyset.keys = keyset.keys, {}  # a cached token no longer needs the key
    assert await verifier.caller(short) == 1
    keyset.keys = saved
    # the scenario: time passes until the cached token's exp is behind us
    await asyncio.sleep(max(0.0, verifier.cache[next(iter(verifier.cache))].expires
                            - time.time()) + 0.1)
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.caller(short)
    for user in (2, 3, 4):  # bounded: the oldest entries go first
        await verifier.caller(f"Bearer {issuer.token(user)}".encode())
    assert len(verifier.cache) == 2


async def test_a_header_spelt_any_way_hits_the_same_cache_entry(issuer, settings):
    """RSGI hands headers over as str (a fast path), ASGI as bytes: the same token,
    however the header is spelt, is one cache entry; a header that is no bearer token,
    or not even latin-1, is refused as unauthenticated, never an error of ours."""
    keyset = KeySet(settings.replace(bff_jwks=str(issuer.jwks)))
    keyset.load()
    verifier = Verifier(settings, keyset)
    token = issuer.token(7)
    assert await verifier.caller(f"Bearer {token}") == 7
    for header in (f"Bearer {token}", f"Bearer {token}  ", f"bearer {token}",
                   f"Bearer   {token}", f"BEARER {token}".encode(), f"Bearer {token}".encode()):
        assert verifier.cached(header) == 7, header
    assert len(verifier.cache) == 1
    for header in ("", "Bearer", "Bearer ", "Basic abc", "Bearer \u20ac" + token, None):
        assert verifier.cached(header) is None
        with pytest.raises(Unauthenticated):
            await verifier.caller(header)


async def test_hs256_only_when_configured_and_only_with_a_secret_key(issuer, tmp_path, settings):
    secret = b"s" * 32
    oct_key = {"kty": "oct", "kid": "shared", "k": jwt.utils.base64url_encode(secret).decode()}
    rsa_jwks = json.loads(issuer.jwks.read_text())
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"keys": [*rsa_jwks["keys"], oct_key]}))
    public_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_token = f"Bearer {issuer.signed(issuer.claims(4), key=secret, kid='shared', alg='HS256')}"
    confused = f"Bearer {_hs256(issuer.claims(4), public_pem, issuer.kid)}"

    def verifier(algorithms: str) -> Verifier:
        s = settings.replace(bff_jwks=str(path), bff_jwt_algorithms=algorithms)
        keyset = KeySet(s)
        keyset.load()
        return Verifier(s, keyset)

    with pytest.raises(Unauthenticated, match="not accepted"):
        await verifier("RS256").caller(hs_token.encode())
    both = verifier("RS256,HS256")
    assert await both.caller(hs_token.encode()) == 4
    # HS256 is allowed now, but the kid names an RSA key: still no confusion
    with pytest.raises(Unauthenticated, match="does not match its key"):
        await both.caller(confused.encode())


# -- issue 21: a token means one thing, for a bounded time ------------------------------


def _raw_token(issuer: Issuer, header: str, payload: str) -> str:
    """A token signed with the issuer's key over JSON text as given (PyJWT would never
    write a key twice)."""
    from jwt.algorithms import RSAAlgorithm

    def b64(raw: bytes) -> str:
        return jwt.utils.base64url_encode(raw).decode()

    signing = f"{b64(header.encode())}.{b64(payload.encode())}"
    signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing.encode(), issuer.key)
    return f"{signing}.{b64(signature)}"


def one_meaning_tokens(issuer: Issuer) -> dict[str, str]:
    """Tokens validly signed by our own issuer that must still be refused."""
    now = int(time.time())
    claims = json.dumps(issuer.claims(5))
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": issuer.kid})
    return {
        "sub twice": _raw_token(issuer, header, '{"sub": "6", ' + claims[1:]),
        "alg twice": _raw_token(issuer, '{"alg": "HS256", ' + header[1:], claims),
        "kid twice": _raw_token(issuer, '{"kid": "other", ' + header[1:], claims),
        "exp 2^62": issuer.signed(issuer.claims(5, exp=2**62, iat=now)),
        "exp 1e300": issuer.signed(issuer.claims(5, exp=1e300)),
        "exp 10^400": issuer.signed(issuer.claims(5, exp=10**400)),
        "exp as text": issuer.signed(issuer.claims(5, exp=str(now + 60))),
        "25 hours from iat": issuer.signed(issuer.claims(5, iat=now, exp=now + 25 * 3600)),
        "25 hours, no iat": issuer.signed(issuer.claims(5, exp=now + 25 * 3600)),
        "sub 007": issuer.signed(issuer.claims(5, sub="005")),
        "sub +5": issuer.signed(issuer.claims(5, sub="+5")),
        "sub ' 5'": issuer.signed(issuer.claims(5, sub=" 5")),
        "sub 5.0": issuer.signed(issuer.claims(5, sub="5.0")),
        "sub 0": issuer.signed(issuer.claims(5, sub="0")),
    }


async def test_tokens_with_two_meanings_or_no_end_are_401(jwt_bff, gate, issuer, product_id):
    await gate.open_sale(product_id, 5)
    stream = gate.keys.stream(product_id)
    async with httpx.AsyncClient(base_url=jwt_bff.url) as client:
        for name, token in one_meaning_tokens(issuer).items():
            r = await client.post(f"/api/v1/seckill/{product_id}", headers=bearer(token))
            assert r.status_code == 401, (name, r.status_code, r.text)
            assert r.json()["error"], name
        assert await gate.redis.xlen(stream) == 0
        # a token just within bff_jwt_max_ttl (24 h by default) is taken
        now = int(time.time())
        token = issuer.signed(issuer.claims(5, iat=now, exp=now + 23 * 3600))
        r = await client.post(f"/api/v1/seckill/{product_id}", headers=bearer(token))
        assert r.status_code == 202, r.text


@pytest.fixture
def verifier(issuer, settings) -> Verifier:
    s = settings.replace(bff_jwks=str(issuer.jwks), bff_jwt_max_ttl=60.0)
    keyset = KeySet(s)
    keyset.load()
    return Verifier(s, keyset)


async def test_why_a_token_with_two_meanings_is_refused(verifier, issuer):
    tokens = one_meaning_tokens(issuer)
    for name in ("sub twice", "kid twice"):
        with pytest.raises(Unauthenticated, match="appears twice"):
            await verifier.caller(f"Bearer {tokens[name]}")
    with pytest.raises(Unauthenticated, match="malformed token: key 'alg' appears twice"):
        await verifier.caller(f"Bearer {tokens['alg twice']}")
    for name in ("sub 007", "sub +5", "sub ' 5'", "sub 5.0", "sub 0"):
        with pytest.raises(Unauthenticated, match="sub: expected a positive"):
            await verifier.caller(f"Bearer {tokens[name]}")
    nan = _raw_token(issuer, json.dumps({"alg": "RS256", "kid": issuer.kid}),
                     json.dumps(issuer.claims(5))[:-1] + ', "iat": NaN}')
    with pytest.raises(Unauthenticated, match="NaN is not a number JSON allows"):
        await verifier.caller(f"Bearer {nan}")
    assert verifier.cache == {}


async def test_lifetime_is_capped_by_bff_jwt_max_ttl(verifier, issuer):
    now = int(time.time())

    async def user(**claims: object) -> int:
        return await verifier.caller(f"Bearer {issuer.signed(issuer.claims(5, **claims))}")

    assert await user(iat=now, exp=now + 59) == 5
    assert await user(exp=now + 30.5) == 5  # a NumericDate may have a fraction
    for claims in ({"iat": now, "exp": now + 61}, {"exp": now + 61},
                   {"iat": now - 100, "exp": now + 30}, {"exp": 2**62}, {"exp": 1e300},
                   {"exp": 10**400, "iat": 1.5}, {"exp": now + 30, "iat": -(10**400)}):
        with pytest.raises(Unauthenticated, match="token lifetime over 60 s"):
            await user(**claims)
    for claims in ({"exp": str(now + 30)}, {"exp": now + 30, "iat": str(now)}):
        with pytest.raises(Unauthenticated, match="expected numbers of seconds"):
            await user(**claims)


async def test_a_full_token_cache_evicts_in_constant_time(verifier, settings):
    """Once full, every new token evicted by a scan of the whole cache: 2 ms per insert
    at 100,000 entries. It must cost what an insert into an empty cache costs."""
    from engine.gate.auth import Caller

    size, batch = 100_000, 1_000
    cache = Verifier(settings.replace(bff_token_cache=size), verifier.keyset)
    caller, keys = Caller(1, time.time() + 3600), iter(range(10**9))

    def per_insert() -> float:
        started = time.perf_counter()
        for _ in range(batch):
            cache._remember(next(keys).to_bytes(16, "big"), caller)
        return (time.perf_counter() - started) / batch

    empty = min(per_insert() for _ in range(3))
    while len(cache.cache) < size:
        cache._remember(next(keys).to_bytes(16, "big"), caller)
    first = next(iter(cache.cache))
    full = min(per_insert() for _ in range(3))
    assert len(cache.cache) == size and first not in cache.cache  # the oldest went
    assert full < 10 * empty, (full, empty)


async def test_what_pyjwt_checked_is_still_checked(verifier, issuer):
    """The verifier checks the signature and the claims itself (issue 22: PyJWT's decode
    cost twice the signature check): each check PyJWT made must still refuse, for its
    own reason."""
    now = int(time.time())

    def claims(**changes: object) -> dict[str, object]:
        return issuer.claims(5, **{"exp": now + 30, **changes})  # within max_ttl (60 s)

    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": issuer.kid})
    text = json.dumps(claims())
    head, body, sig = issuer.signed(claims()).split(".")
    other_body = issuer.signed(claims(sub="6")).split(".")[1]
    refused = {
        "not yet valid": [issuer.signed(claims(nbf=now + 30)),
                          issuer.signed(claims(iat=now + 30))],
        "critical header": [_raw_token(issuer, '{"crit": ["exp"], "exp": 1, ' + header[1:],
                                       text),
                            _raw_token(issuer, '{"b64": false, ' + header[1:], text)],
        "kid.* must be a string": [_raw_token(issuer, json.dumps({"alg": "RS256", "kid": 7}),
                                              text)],
        "audience doesn't match": [issuer.signed(claims(aud=["a", "b"]))],
        "invalid claim format": [issuer.signed(claims(aud=5))],
        'missing the "iss" claim': [issuer.signed({k: v for k, v in claims().items()
                                                   if k != "iss"})],
        "jti.* must be a string": [issuer.signed(claims(jti=5))],
        "expected numbers of seconds": [issuer.signed(claims(nbf=str(now)))],
        "not base64url": [f"+{head[1:]}.{body}.{sig}", f"{head}.{body}.{sig[:-2]}!!",
                          f"\xe9{head}.{body}.{sig}"],
        "three dot-separated segments": [f"{head}.{body}.{sig}.{sig}"],
        "signature verification failed": [f"{head}.{other_body}.{sig}"],
    }
    for why, tokens in refused.items():
        for token in tokens:
            with pytest.raises(Unauthenticated, match=why):
                await verifier.caller(f"Bearer {token}")
    assert verifier.cache == {}
    # and what PyJWT took is still taken: an aud list naming us, padding on a segment
    listed = issuer.signed(claims(aud=["x", issuer.aud]))
    assert await verifier.caller(f"Bearer {listed}") == 5
    head, body, sig = issuer.signed(claims(sub="8", n="ab")).split(".")
    for pad in range(3):  # (one of three lengths takes no padding)
        if len(body + "=" * pad) % 4 == 0:
            assert await verifier.caller(f"Bearer {head}.{body}{'=' * pad}.{sig}") == 8
