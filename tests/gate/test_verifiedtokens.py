"""The verified-token table the BFF's workers share (engine/gate/verifiedtokens.py).

On the real BFF with two workers: a token one worker verified is not verified
again by the other (which worker holds a connection is read from /proc, as the
benchmark's warm-up does). On the table itself: a torn, foreign or expired slot
is a miss, never an identity.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import time

import httpx
import pytest

from bench.tokens import connections_per_worker
from engine.gate.auth import KeySet, Unauthenticated, Verifier, _digest
from engine.gate.verifiedtokens import SLOT, VerifiedTokens, shared_table
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, children, engine_env, stop_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def table():
    """A table as the BFF's supervisor makes it, attached as a worker attaches."""
    with shared_table(64):
        shared = VerifiedTokens.attach()
        assert shared is not None
        yield shared
        shared.close()


def verifier(settings, issuer) -> Verifier:
    """A worker's verifier: its own empty cache, the shared table from the environment."""
    s = settings.replace(bff_jwks=str(issuer.jwks))
    keyset = KeySet(s)
    keyset.load()
    return Verifier(s, keyset)


def test_the_table_is_private_and_gone_after_stop():
    with shared_table(10) as path:
        assert path is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert not os.path.exists(os.path.dirname(path))
    assert VerifiedTokens.attach() is None  # and no worker started later finds it


def test_a_torn_slot_is_a_miss(table):
    digest = _digest(b"token-a")
    table.put(digest, 5, time.time() + 60)
    home = (int.from_bytes(digest[:8], "little") & table.mask) * SLOT.size
    old = table.memory[home:home + SLOT.size]
    table.put(digest, 6, time.time() + 90)  # a second writer of the same slot...
    assert table.get(digest) == (6, pytest.approx(time.time() + 90, abs=5))
    new = table.memory[home:home + SLOT.size]
    # ... read half-way through: the new key and user ID, the old expiry and MAC
    table.memory[home:home + SLOT.size] = new[:24] + old[24:]
    assert table.get(digest) is None


def test_a_slot_not_signed_with_this_tables_key_is_a_miss(table):
    digest = _digest(b"token-b")
    with shared_table(64) as other_path:  # another BFF's table: same layout, its own key
        other = VerifiedTokens.attach()
        assert other is not None and other_path is not None
        other.put(digest, 7, time.time() + 60)
        home = (int.from_bytes(digest[:8], "little") & other.mask) * SLOT.size
        forged = other.memory[home:home + SLOT.size]
        other.close()
    slot = (int.from_bytes(digest[:8], "little") & table.mask) * SLOT.size
    table.memory[slot:slot + SLOT.size] = forged
    assert table.get(digest) is None
    # and a slot of zeros with the token's hash (what a writer without the key makes)
    table.memory[slot:slot + SLOT.size] = SLOT.pack(digest, 7, time.time() + 60, b"\0" * 16)
    assert table.get(digest) is None


async def test_workers_share_verified_tokens_but_never_past_exp(table, settings, issuer):
    first, second = verifier(settings, issuer), verifier(settings, issuer)
    assert first.shared is not None and second.shared is not None
    token = f"Bearer {issuer.token(11)}"
    before = first.verified._value.get()  # (one counter per process: both count into it)
    assert await first.caller(token) == 11
    assert second.cached(token) is None  # not verified here ...
    assert await second.caller(token) == 11  # ... but by the other worker, once
    assert second.cached(token) == 11  # and now known here without the table
    assert second.verified._value.get() - before == 1
    # a foreign entry for a token never verified names nobody: it is verified here
    other = f"Bearer {issuer.token(12)}"
    digest = _digest(other[7:].encode())
    home = (int.from_bytes(digest[:8], "little") & table.mask) * SLOT.size
    table.memory[home:home + SLOT.size] = SLOT.pack(digest, 99, time.time() + 60, b"\0" * 16)
    assert await second.caller(other) == 12
    # a token that expired is refused, though the table once held it
    short = f"Bearer {issuer.token(13, ttl=1)}"
    assert await first.caller(short) == 13
    await asyncio.sleep(max(0.0, first.cache[_digest(short[7:].encode())].expires
                            - time.time()) + 0.1)
    third = verifier(settings, issuer)
    with pytest.raises(Unauthenticated, match="expired"):
        await third.caller(short)


# -- the real BFF, two workers -----------------------------------------------------------

VERIFIED = re.compile(rb'seckill_bff_token_verifications_total\{result="verified"\} (\S+)')


class TwoWorkerBff:
    def __init__(self, settings) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [SECKILL, "bff", "--port", str(self.port), "--workers", "2"],
            env=engine_env(settings, bff_admin_port=self.admin_port),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if (httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code
                        == 200 and len(children(self.proc.pid)) == 2):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the BFF did not start")

    def verifications(self) -> float:
        body = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).content
        match = VERIFIED.search(body)
        return float(match.group(1)) if match else 0.0

    def table_path(self) -> str:
        """The shared table, as the workers map it."""
        maps = open(f"/proc/{children(self.proc.pid)[0]}/maps").read()  # noqa: SIM115
        return next(line.split()[-1] for line in maps.splitlines()
                    if line.endswith("/verified-tokens"))

    def stop(self) -> None:
        stop_process(self.proc, 15)


async def _get(conn, path: str, token: str) -> bytes:
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n"
                 .encode())
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status.split(b" ")[1]


async def test_a_token_verified_by_one_worker_is_known_to_the_other(auth_settings, issuer,
                                                                   product_id):
    bff = TwoWorkerBff(auth_settings)
    try:
        workers = children(bff.proc.pid)
        held = await connections_per_worker(bff.port, workers, 1)
        first, second = (held[pid][0] for pid in workers)
        path = f"/api/v1/seckill/{product_id}/users/1"  # no token names user 1: 403
        tokens = [issuer.token(100 + n) for n in range(5)]
        before = bff.verifications()
        for token in tokens:  # the sale page, loaded on one worker ...
            assert await _get(first, path, token) == b"403"
        assert bff.verifications() - before == len(tokens)
        for token in tokens:  # ... and the purchase landing on the other
            assert await _get(second, path, token) == b"403"
        assert bff.verifications() - before == len(tokens)
        table = bff.table_path()
        assert stat.S_IMODE(os.stat(table).st_mode) == 0o600
        for conn in (first, second):
            conn[1].close()
    finally:
        bff.stop()
    assert not os.path.exists(table)  # removed when the BFF stops


def test_a_table_not_private_to_the_bff_is_not_used(settings, issuer, caplog):
    with shared_table(16) as path:
        assert path is not None
        os.chmod(path, 0o644)  # readable by others: not ours alone any more
        with pytest.raises(PermissionError, match="mode 0600"):
            VerifiedTokens.attach()
        assert verifier(settings, issuer).shared is None
        assert "verified-token table not used" in caplog.text
