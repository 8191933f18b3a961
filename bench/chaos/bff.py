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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from engine.config import Settings, to_env
from engine.gate.devkeys import DevIssuer, init_keys

from .hostile import Tokens
from .runner import Proc, free_port

TOKEN_TTL = 3600
START_TIMEOUT = 30.0


class Bff:
    """One `seckill bff` process (one worker) on a free port, and its issuer."""

    def __init__(self, settings: Settings, users: range, overrides: dict[str, Any]) -> None:
        keys = Path(tempfile.mkdtemp(prefix="seckill-chaos-keys-"))
        self.jwks, private = init_keys(keys)
        issuer = DevIssuer(private, issuer=settings.bff_jwt_issuer,
                           audience=settings.bff_jwt_audience)
        self.tokens = {u: issuer.token(u, TOKEN_TTL) for u in users}
        self.bad = Tokens(str(private), str(self.jwks), settings.bff_jwt_issuer,
                          settings.bff_jwt_audience)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = to_env(settings, **{"bff_auth": "jwt", "bff_jwks": str(self.jwks),
                                  "bff_admin_port": 0, "log_json": False,
                                  "metrics_port": 0, **overrides})
        self.proc = Proc(["bff", "--port", str(self.port), "--workers", "1"], env, "bff")

    @classmethod
    async def start(cls, settings: Settings, users: range,
                    overrides: dict[str, Any]) -> Bff:
        """Started and answering /healthz (minting the tokens takes a second or two)."""
        bff = await asyncio.to_thread(cls, settings, users, overrides)
        deadline = time.monotonic() + START_TIMEOUT
        async with bff.client() as client:
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return bff
                except httpx.HTTPError:
                    pass
                if bff.proc.proc.poll() is not None or time.monotonic() > deadline:
                    bff.proc.stop()
                    raise RuntimeError("the BFF did not start:\n" + bff.proc.output()[-2000:])
                await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=10, limits=limits) as client:
            yield client

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

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
