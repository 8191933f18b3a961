"""The OpenAPI 3.1 document against the real BFF: schemathesis fuzzes every operation
(no 500, every status code, header and body as documented), then the sale's
invariants must still hold: no unit sold twice, none lost, one order per buyer."""

from __future__ import annotations

import asyncio
import random
import uuid
import zlib

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.gate.devkeys import DevIssuer, init_keys
from engine.gate.openapi import document
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.testing.bff import Bff

pytestmark = pytest.mark.timeout(600)

schema = schemathesis.openapi.from_dict(document())
PID = random.randrange(10**9, 9 * 10**9)
USER = 77
STOCK = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed(base_settings, test_db, test_vhost, tmp_path_factory):
    """A BFF with authentication on, a sale of STOCK units, and a token of USER."""
    prefix = f"test:fuzz:{uuid.uuid4().hex[:8]}:"
    s = base_settings.replace(pg_dsn=test_db, amqp_url=test_vhost, key_prefix=prefix,
                              metrics_port=0, log_json=False)
    jwks, private = init_keys(tmp_path_factory.mktemp("keys"))
    token = DevIssuer(private, issuer=s.bff_jwt_issuer, audience=s.bff_jwt_audience).token(
        USER, ttl=3600)
    asyncio.run(_open_sale(s))
    server = Bff(s, bff_auth="jwt", bff_jwks=str(jwks))
    yield s, server, {"Authorization": f"Bearer {token}"}
    server.stop()


async def _open_sale(s) -> None:
    redis = Redis.from_url(s.redis_url)
    try:
        await Gate(redis, Keys(s.key_prefix)).open_sale(PID, STOCK)
    finally:
        await redis.aclose()


def _share(value: object, parts: int) -> int:
    """Which of `parts` shares a generated value falls in: the same on every run
    (hash() of a str is salted per process)."""
    return zlib.crc32(str(value).encode()) % parts


def _sale_buyers(s) -> set[int]:
    """The sale's invariants (no unit sold twice, none lost, one order per buyer), checked
    on Redis; returns the buyers."""
    redis = SyncRedis.from_url(s.redis_url)
    keys = Keys(s.key_prefix)
    try:
        entries = redis.xrange(keys.stream(PID))
        stock = int(redis.get(keys.stock(PID)))
        buyers = {int(b) for b in redis.smembers(keys.buyers(PID))}
    finally:
        redis.close()
    uids = [int(fields[b"uid"]) for _, fields in entries]
    slots = [int(fields[b"slot"]) for _, fields in entries]
    assert len(uids) == len(set(uids)) == len(buyers) and set(uids) == buyers
    assert len(slots) == len(set(slots)) and stock + len(entries) == STOCK
    return buyers


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_public_api_answers_as_documented(fuzzed, case):
    s, server, auth = fuzzed
    params = case.path_parameters or {}
    # half the time the product on sale and the token's own user, so purchases and
    # order lookups really happen; the other half whatever was generated
    if "product_id" in params and _share(params["product_id"], 2) == 0:
        params["product_id"] = PID
        if "user_id" in params:
            params["user_id"] = USER
    headers = auth if _share(case.body, 4) else {}  # sometimes no token at all
    case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS)
    # after every call, whatever it was: only the token's user can have bought
    assert _sale_buyers(s) <= {USER}


async def test_the_token_user_buys_once_and_the_sale_invariants_hold(fuzzed):
    """On its own or after the fuzzing (which may have bought for the token's user
    already: 409), in whatever order the tests run."""
    s, server, auth = fuzzed
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        r = await client.post(f"/api/v1/seckill/{PID}", json={}, headers=auth)
    assert r.status_code in (202, 409), r.text
    assert _sale_buyers(s) == {USER}  # the token's user bought, and nobody else ever did
