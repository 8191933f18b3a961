"""`seckill stats`, `seckill dlq` and `seckill trim` against the real services."""

from __future__ import annotations

import json
import subprocess

import pytest
from redis.asyncio import Redis
from support import (
    SECKILL,
    EngineProcess,
    add_products,
    announce,
    engine_env,
    log_rows,
    pending_count,
    push_orders,
    wait_for,
)

from engine.keys import GROUP, Keys
from engine.trim import trim_stream

pytestmark = pytest.mark.timeout(120)


def seckill(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SECKILL, *args], env=engine_env(settings), capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
async def redis(settings):
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


async def test_trim_removes_only_acknowledged_entries(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    stream = keys.stream(product_id)
    await announce(redis, keys, product_id)
    ids = await push_orders(redis, keys, product_id, range(1, 11))
    await redis.xreadgroup(GROUP, "c1", {stream: ">"}, count=6)  # 1..6 delivered
    await redis.xack(stream, GROUP, ids[0], ids[1], ids[3])  # 3 pending (2, 4, 5 by index)
    assert await trim_stream(redis, stream) == 2  # only the two before the first pending
    left = [e[0].decode() for e in await redis.xrange(stream)]
    assert left == ids[2:]
    await redis.xack(stream, GROUP, *ids[2:6])  # everything delivered is acknowledged
    assert await trim_stream(redis, stream) == 4
    assert [e[0].decode() for e in await redis.xrange(stream)] == ids[6:]  # unread stay
    assert await trim_stream(redis, stream) == 0
    await redis.xreadgroup(GROUP, "c1", {stream: ">"})
    assert await trim_stream(redis, stream) == 0  # delivered but pending: kept
    assert await redis.xlen(stream) == 4


async def test_trim_leaves_streams_without_a_group_alone(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    await redis.xadd(keys.stream(product_id), {"uid": "1"})
    assert await trim_stream(redis, keys.stream(product_id)) == 0
    done = seckill(settings, "trim")
    assert done.returncode == 0, done.stderr


async def test_dead_letter_replay_keeps_one_row_per_order(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    await announce(redis, keys, product_id)
    (first_id,) = await push_orders(redis, keys, product_id, [42])
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 1), 30, "dead letter")
        listed = seckill(settings, "dlq", "list", "--product", str(product_id))
        assert "unknown_product" in listed.stdout and first_id in listed.stdout
        (dlq_id, fields), = await redis.xrange(keys.dlq(product_id))
        shown = json.loads(seckill(settings, "dlq", "show", "--product", str(product_id),
                                   dlq_id.decode()).stdout)
        assert shown["fields"]["uid"] == "42" and shown["id"] == first_id
        await add_products(settings, [product_id])  # the fix
        replayed = seckill(settings, "dlq", "replay", "--product", str(product_id), "--all")
        assert "replayed 1" in replayed.stdout, replayed.stderr
        await wait_for(lambda: _logged(settings, product_id), 30, "the replayed order")
        await wait_for(lambda: _no_pending(redis, keys, product_id), 10, "acknowledged")
    finally:
        engine.stop()
    (row,) = await log_rows(settings, [product_id])
    assert row["stream_id"] == first_id and row["user_id"] == 42
    assert await redis.xlen(keys.dlq(product_id)) == 0
    stats = json.loads(seckill(settings, "stats", "--json").stdout)
    mine = next(s for s in stats if s["product"] == product_id)
    assert (mine["logged"], mine["pending"], mine["dead_letters"], mine["accepted"]) == (
        1, 0, 0, 2)
    table = seckill(settings, "stats").stdout
    assert "dead letters" in table and str(product_id) in table


async def test_dlq_drop_needs_ids_or_all(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    await redis.xadd(keys.dlq(product_id), {"id": "1-1", "reason": "bad_entry",
                                            "detail": "x", "fields": "{}", "at": "0"})
    refused = seckill(settings, "dlq", "drop", "--product", str(product_id))
    assert refused.returncode == 2 and "use --all" in refused.stderr
    assert "dropped 1" in seckill(settings, "dlq", "drop", "--product", str(product_id),
                                  "--all").stdout
    assert await redis.xlen(keys.dlq(product_id)) == 0


async def _xlen(redis, key, n) -> bool:
    return await redis.xlen(key) == n


async def _logged(settings, pid) -> bool:
    return len(await log_rows(settings, [pid])) == 1


async def _no_pending(redis, keys, pid) -> bool:
    return await pending_count(redis, keys, [pid]) == 0
