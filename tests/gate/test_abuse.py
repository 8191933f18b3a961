"""Abusive clients against the real BFF with authentication on: failed token checks
are throttled per client address before the signature check, a token check counts
in flight, and a request naming its bearer twice is refused."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.devkeys import DevIssuer, init_keys
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.bff import Bff

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"  # another loopback address: another client to the BFF


class Tokens:
    """Good tokens of our development key, and tokens that name its kid but were
    signed by another key (each refused only by the signature check)."""

    def __init__(self, tmp_path, settings: Settings) -> None:
        self.jwks, private = init_keys(tmp_path / "keys")
        _, other = init_keys(tmp_path / "other")
        names = {"issuer": settings.bff_jwt_issuer, "audience": settings.bff_jwt_audience}
        self.good = DevIssuer(private, **names)
        self.forger = DevIssuer(other, **names)
        self.forger.kid = self.good.kid

    def bearer(self, user: int) -> dict[str, str]:
        return {"authorization": f"Bearer {self.good.token(user, 900)}"}

    def forged(self, user: int) -> dict[str, str]:
        return {"authorization": f"Bearer {self.forger.token(user, 900)}"}


@pytest.fixture
def tokens(tmp_path, settings) -> Tokens:
    return Tokens(tmp_path, settings)


@pytest.fixture
def jwt_settings(settings, tokens) -> Settings:
    return settings.replace(bff_auth="jwt", bff_jwks=str(tokens.jwks))


async def refused_checks(bff: Bff) -> float:
    """Tokens this BFF refused after a signature check (its admin port's counter)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(bff.admin_url + "/metrics")).text
    found = re.search(r'seckill_bff_token_verifications_total\{result="refused"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def client_from(address: str, url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=10,
                             transport=httpx.AsyncHTTPTransport(local_address=address))


async def test_failed_token_checks_are_throttled_per_address(jwt_settings, tokens, product_id):
    server = Bff(jwt_settings, bff_auth_failure_rate=0.5, bff_auth_failure_burst=3)
    redis = Redis.from_url(jwt_settings.redis_url)
    buy = f"/api/v1/seckill/{product_id}"
    try:
        await Gate(redis, Keys(jwt_settings.key_prefix)).open_sale(product_id, 10)
        verified = tokens.bearer(1)
        async with client_from(ATTACKER, server.url) as attacker:
            seen = await attacker.post(buy, headers=verified)  # its token verified
            assert seen.status_code == 202, seen.text
            codes = [(await attacker.post(buy, headers=tokens.forged(2))).status_code
                     for _ in range(12)]
            assert codes == [401] * 3 + [429] * 9, codes
            throttled = await attacker.post(buy, headers=tokens.forged(2))
            assert int(throttled.headers["retry-after"]) >= 1
            assert "failed authentications" in throttled.json()["error"]
            # from that address a token not verified yet waits too, even a good one ...
            assert (await attacker.post(buy, headers=tokens.bearer(3))).status_code == 429
            # ... a buyer whose token was verified before goes on
            again = await attacker.get(f"{buy}/order", headers=verified)
            assert again.status_code == 200, again.text
        assert await refused_checks(server) == 3  # no signature checked past the burst
        async with client_from("127.0.0.1", server.url) as other:  # another address
            assert (await other.post(buy, headers=tokens.bearer(4))).status_code == 202
            assert (await other.post(buy, headers=tokens.forged(5))).status_code == 401
    finally:
        server.stop()
        await redis.aclose()


async def test_a_token_check_counts_in_flight(private_redis_settings, tokens, product_id):
    """With the cap taken by a purchase waiting on Redis, a token not verified yet is
    refused 429 before its signature is checked."""
    settings = private_redis_settings.replace(bff_auth="jwt", bff_jwks=str(tokens.jwks))
    server = Bff(settings, bff_max_inflight=1)
    redis = Redis.from_url(settings.redis_url)
    buy = f"/api/v1/seckill/{product_id}"
    try:
        await Gate(redis, Keys(settings.key_prefix)).open_sale(product_id, 10)
        verified = tokens.bearer(1)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            await client.get(f"{buy}/order", headers=verified)  # verified, cached
            await redis.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            held = asyncio.ensure_future(client.post(buy, headers=verified))
            await asyncio.sleep(0.3)  # (its attempt is waiting on the paused Redis)
            assert not held.done()
            before = await refused_checks(server)
            shed = await client.post(buy, headers=tokens.forged(2))
            assert shed.status_code == 429, shed.text
            assert shed.json()["error"].startswith("too many requests in flight")
            assert (await held).status_code == 202
        assert await refused_checks(server) == before
    finally:
        server.stop()
        await redis.aclose()


async def two_authorizations(port: int, path: str, first: str, second: str) -> bytes:
    """A request with two Authorization lines (httpx would join them into one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
                     f"authorization: {first}\r\nauthorization: {second}\r\n"
                     "connection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_two_authorization_headers_are_refused(jwt_settings, tokens, product_id,
                                                     interface):
    server = Bff(jwt_settings, bff_interface=interface)
    redis = Redis.from_url(jwt_settings.redis_url)
    buy = f"/api/v1/seckill/{product_id}"
    try:
        gate = Gate(redis, Keys(jwt_settings.key_prefix))
        await gate.open_sale(product_id, 10)
        good = tokens.bearer(1)["authorization"]
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            await client.get(f"{buy}/order", headers={"authorization": good})  # cached
        for first, second in ((good, "Bearer garbage"), ("Bearer garbage", good),
                              (good, good)):
            answer = await two_authorizations(server.port, buy, first, second)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
            assert b"authorization: sent 2 times" in answer, answer
        assert await redis.xlen(gate.keys.stream(product_id)) == 0
    finally:
        server.stop()
        await redis.aclose()


async def test_a_body_declared_too_large_is_refused_before_its_token_is_checked(
        jwt_settings, tokens, product_id):
    server = Bff(jwt_settings)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            r = await client.post(f"/api/v1/seckill/{product_id}", headers=tokens.forged(1),
                                  content=b"x" * 65536)
        assert r.status_code == 400 and r.json()["error"] == "body larger than 1024 bytes"
        assert await refused_checks(server) == 0
    finally:
        server.stop()
