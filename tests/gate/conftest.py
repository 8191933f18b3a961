"""The gate's tests: the BFF runs without authentication unless a test gives it keys
(tests/gate/test_auth.py does), so the older tests keep naming the buyer in the body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from jwtissuer import Issuer
from redis.asyncio import Redis

from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.replace(bff_auth="none")


@pytest.fixture
async def gate(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Gate]:
    """The gate on the shared Redis, under the test's key prefix: one EVALSHA per call,
    or, parametrized indirectly with True, the calls of a loop turn pipelined (what the
    BFF uses; tests/gate/test_gate.py runs every test both ways).

    Up to 256 connections: 200 concurrent one-call attempts each hold one, past
    redis-py's default pool of 100.
    """
    redis = Redis.from_url(settings.redis_url, max_connections=256)
    yield Gate(redis, Keys(settings.key_prefix), coalesce=getattr(request, "param", False))
    await redis.aclose()


@pytest.fixture
def issuer(tmp_path, settings) -> Issuer:
    return Issuer(tmp_path / "keys", settings)


@pytest.fixture
def auth_settings(settings, issuer) -> Settings:
    return settings.replace(bff_auth="jwt", bff_jwks=str(issuer.jwks))
