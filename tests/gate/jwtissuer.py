"""Tokens for the gate's tests: a development key pair and the tokens a test needs, good
and bad (the `issuer` fixture of tests/gate/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt

from engine.config import Settings
from engine.gate.devkeys import init_keys, mint_token


class Issuer:
    """A development key pair and the tokens a test needs, good and bad."""

    def __init__(self, directory: Path, settings: Settings) -> None:
        self.jwks, self.private = init_keys(directory)
        self.data = json.loads(self.private.read_text())
        self.key = jwt.PyJWK(self.data).key
        self.kid = self.data["kid"]
        self.iss, self.aud = settings.bff_jwt_issuer, settings.bff_jwt_audience

    def token(self, user: int, ttl: int = 900) -> str:
        return mint_token(self.private, user, ttl=ttl, issuer=self.iss, audience=self.aud)

    def claims(self, user: int, **changes: object) -> dict[str, object]:
        now = int(time.time())
        return {"sub": str(user), "iss": self.iss, "aud": self.aud, "exp": now + 900,
                **changes}

    def signed(self, claims: dict[str, object], key: object = None, kid: str | None = None,
               alg: str = "RS256") -> str:
        return jwt.encode(claims, key or self.key, algorithm=alg,
                          headers={"kid": kid or self.kid})
