"""`seckill keys init` and `seckill token`: a local development issuer.

`keys init` writes the public half as a JWKS the BFF may read (`bff_jwks`) and
the private half apart, in a directory only its owner can enter, so pointing
the BFF at the JWKS never hands it the power to mint tokens. `token` signs a
short-lived token for one user with that private key: what a login service
would give a buyer, for the demo, the load test and by-hand trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput

# cryptography and PyJWT are imported where used: `seckill --help` builds this
# module's defaults into the parser and should not load them

DEFAULT_DIR = ".seckill/keys"
JWKS_NAME = "jwks.json"
PRIVATE_NAME = "private/signing-key.json"
_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """Seconds from `900`, `90s`, `15m`, `2h` or `1d`."""
    match = _TTL.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise InvalidInput(f"ttl: expected a duration like 15m, 2h or 900, got {text!r}")
    return int(match.group(1)) * _UNIT[match.group(2)]


def init_keys(directory: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """An RS256 key pair: (public JWKS path, private JWK path). An existing pair is kept
    unless `force`: tokens minted with it stay valid."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    root = Path(directory)
    public, private = root / JWKS_NAME, root / PRIVATE_NAME
    if public.exists() and private.exists() and not force:
        return public, private
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    kid = hashlib.sha256(public_jwk["n"].encode()).hexdigest()[:16]
    meta = {"kid": kid, "alg": "RS256", "use": "sig"}
    private_jwk = {**json.loads(RSAAlgorithm.to_jwk(key)), **meta}
    root.mkdir(parents=True, exist_ok=True)
    private.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private.parent, 0o700)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(private_jwk, f)
    public.write_text(json.dumps({"keys": [{**public_jwk, **meta}]}, indent=2) + "\n")
    return public, private


class DevIssuer:
    """Mints tokens with the development key, loaded once: loading an RSA private key
    checks it, which costs far more than a signature (the demo mints thousands)."""

    def __init__(self, private_key: str | os.PathLike[str], *, issuer: str,
                 audience: str) -> None:
        import jwt

        try:
            data = json.loads(Path(private_key).read_text())
            self.key = jwt.PyJWK(data).key
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise InvalidInput(f"signing key {private_key}: {exc} (run `seckill keys init`)") \
                from exc
        self.alg = str(data.get("alg", "RS256"))
        self.kid = data.get("kid")
        self.issuer, self.audience = issuer, audience

    def token(self, user_id: int, ttl: int) -> str:
        """A token for `user_id`, valid for `ttl` seconds."""
        import jwt

        now = int(time.time())
        claims = {"sub": str(user_id), "iss": self.issuer, "aud": self.audience, "iat": now,
                  "exp": now + ttl}
        return jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": self.kid})


def mint_token(private_key: str | os.PathLike[str], user_id: int, *, ttl: int,
               issuer: str, audience: str) -> str:
    """One token for `user_id`, signed with the development key, valid for `ttl` seconds."""
    return DevIssuer(private_key, issuer=issuer, audience=audience).token(user_id, ttl)
