"""A short Locust rehearsal in the test suite, and proof that the verifier can fail."""

from __future__ import annotations

import subprocess
import sys

import pytest
from redis.asyncio import Redis
from support import engine_env

from engine.gate.client import Gate
from engine.gate.devkeys import init_keys
from engine.keys import Keys
from loadtest.verify import tried_key, verify

pytestmark = pytest.mark.timeout(240)


def test_short_rehearsal_with_the_engine_passes_the_verifier(settings, product_id, tmp_path):
    # authentication on: Locust's users log in with tokens minted from a development key
    jwks, signing_key = init_keys(tmp_path / "keys")
    env = engine_env(settings, bff_auth="jwt", bff_jwks=str(jwks))
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--users", "300", "--spawn-rate", "150",
         "--run-time", "10s", "--stock", "80", "--product", str(product_id), "--engine",
         "--bff-workers", "1", "--reports", str(tmp_path)],
        env={**env, "SECKILL_LT_SIGNING_KEY": str(signing_key)}, capture_output=True,
        text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verifier: all invariants hold" in done.stdout
    assert list(tmp_path.glob("*_stats.csv")) and list(tmp_path.glob("*.html"))


async def test_the_verifier_reports_violations(settings, product_id):
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    try:
        sale = await gate.open_sale(product_id, 3)
        for uid in (1, 2):
            await gate.buy(product_id, uid)
            await redis.sadd(tried_key(keys, product_id), uid)
        assert await verify(settings, product_id, sale, 3) == []
        # a unit sold twice and a user accepted twice, as a broken gate would write them
        await redis.xadd(keys.stream(product_id), {"uid": "1", "ts": "1", "sale": sale,
                                                   "slot": "3"})
        problems = await verify(settings, product_id, sale, 3)
    finally:
        await redis.aclose()
    text = "\n".join(problems)
    assert "users accepted more than once" in text
    assert "accepted 3 != min(stock 3, tried 2)" in text
    assert "stock left 1 does not match 3 accepted of 3" in text
