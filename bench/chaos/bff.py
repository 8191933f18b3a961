"""The BFF of a chaos fault: `seckill bff` with JWT authentication on, as in production.

Its keys are a development pair of the run's own (engine.gate.devkeys, as
tests/gate/test_auth.py and the load test use); every buyer gets a token minted
with it, the hostile users get the bad ones (hostile.Tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from engine.config import Settings
from engine.gate.devkeys import DevIssuer, init_keys
from engine.testing import bff

from .hostile import Tokens

TOKEN_TTL = 3600


class Bff:
    """One `seckill bff` process (one worker), the tokens of its buyers, and their
    purchases and order lookups over HTTP."""

    def __init__(self, settings: Settings, users: range, overrides: dict[str, Any]) -> None:
        keys = Path(tempfile.mkdtemp(prefix="seckill-chaos-keys-"))
        self.jwks, private = init_keys(keys)
        issuer = DevIssuer(private, issuer=settings.bff_jwt_issuer,
                           audience=settings.bff_jwt_audience)
        self.tokens = {u: issuer.token(u, TOKEN_TTL) for u in users}
        self.bad = Tokens(str(private), str(self.jwks), settings.bff_jwt_issuer,
                          settings.bff_jwt_audience)
        self.server = bff.Bff(settings, bff_auth="jwt", bff_jwks=str(self.jwks),
                              log_json=False, metrics_port=0, **overrides)
        self.url = self.server.url

    @classmethod
    async def start(cls, settings: Settings, users: range,
                    overrides: dict[str, Any]) -> Bff:
        """Started and answering /healthz (minting the tokens takes a second or two)."""
        return await asyncio.to_thread(cls, settings, users, overrides)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=10, limits=limits) as client:
            yield client

    def alive(self) -> bool:
        return self.server.alive()

    def stop(self) -> None:
        self.server.stop()

    async def buy(self, client: httpx.AsyncClient, pid: int,
                  user: int) -> tuple[int | None, dict[str, Any]]:
        """A buyer's purchase: (status, JSON body); (None, {}) when there was no answer."""
        return await self._call(client, "POST", f"/api/v1/seckill/{pid}", user)

    async def order(self, client: httpx.AsyncClient, pid: int,
                    user: int) -> tuple[int | None, dict[str, Any]]:
        """A buyer's own order lookup."""
        return await self._call(client, "GET", f"/api/v1/seckill/{pid}/order", user)

    async def _call(self, client: httpx.AsyncClient, method: str, path: str,
                    user: int) -> tuple[int | None, dict[str, Any]]:
        try:
            reply = await client.request(method, path, headers={
                "authorization": f"Bearer {self.tokens[user]}"})
        except httpx.HTTPError:
            return None, {}
        try:
            body = json.loads(reply.content)
        except ValueError:
            body = {"not JSON": reply.text[:200]}
        return reply.status_code, body if isinstance(body, dict) else {"JSON": body}
