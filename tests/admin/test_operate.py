"""`seckill stats`, `seckill dlq` and `seckill trim` against the real services."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from dataclasses import asdict

import asyncpg
import pytest
from redis import Redis as SyncRedis
from support import add_products, announce, log_rows, pending_count, push_orders

from engine.admin.stats import collect
from engine.admin.trim import trim_stream
from engine.gate.redis_gate import Gate
from engine.keys import GROUP, Keys
from engine.pipeline.orderrows import prepare_connection, write_batch
from engine.pipeline.orders import Order
from engine.testing.processes import SECKILL, EngineProcess, engine_env
from engine.testing.waits import wait_for, wait_until

pytestmark = pytest.mark.timeout(120)


def seckill(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SECKILL, *args], env=engine_env(settings), capture_output=True,
                          text=True, timeout=60)


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
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 5)
    first_id = (await gate.buy(product_id, 42)).stream_id  # no such product yet
    engine = EngineProcess(settings, workers=1)
    try:
        await wait_for(lambda: _xlen(redis, keys.dlq(product_id), 1), 30, "dead letter")
        await wait_for(lambda: _no_pending(redis, keys, product_id), 10, "acknowledged")
        assert _mine(seckill_json(settings), product_id) | {"sale": None} == figures(
            accepted=1, logged=0, published=0, pending=0, dead_letters=1)
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
    # one order, read twice from the stream (first try, then its replay): accepted once
    assert _mine(seckill_json(settings), product_id) | {"sale": None} == figures(
        accepted=1, logged=1, published=1, pending=0, dead_letters=0)
    table = seckill(settings, "stats").stdout
    assert "dead letters" in table and str(product_id) in table


async def test_stats_count_only_the_open_sale(settings, redis, product_id):
    """Rows of an earlier sale do not count; each order is counted where it is."""
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    earlier = await gate.open_sale(product_id, 10)
    old = [(await gate.buy(product_id, uid)).stream_id for uid in (1, 2)]
    sale = await gate.open_sale(product_id, 10)
    new = [(await gate.buy(product_id, uid)).stream_id for uid in (3, 4, 5, 6, 7)]
    stream = keys.stream(product_id)
    await redis.xreadgroup(GROUP, "c1", {stream: ">"}, count=6)  # 7's order stays unread
    await redis.xack(stream, GROUP, *old, new[0], new[3])
    await redis.xadd(keys.dlq(product_id), {  # 6's order, dead-lettered as the engine does
        "id": new[3], "reason": "unknown_product", "detail": "x", "at": "0",
        "fields": json.dumps({"uid": "6", "ts": "1", "sale": sale, "slot": "7"})})
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=1,
                                     init=prepare_connection)
    try:  # rows: both orders of the earlier sale, and 3 (acknowledged) and 4 (pending)
        await write_batch(pool, [
            Order(product_id, uid, sid, 1, s, slot, b"s", product_id * 10 + uid)
            for uid, sid, s, slot in ((1, old[0], earlier, 10), (2, old[1], earlier, 9),
                                      (3, new[0], sale, 10), (4, new[1], sale, 9))], 10)
        await pool.execute("UPDATE seckill_logs SET status = 'RUNNING' WHERE instance_id = $1",
                           product_id * 10 + 3)
    finally:
        await pool.close()
    sync = SyncRedis.from_url(settings.redis_url)
    try:
        (mine,) = [s for s in await collect(settings, sync) if s.product == product_id]
    finally:
        sync.close()
    # accepted: 2 rows + 1 unread (7) + 1 pending without a row (5) + 1 dead letter (6)
    assert asdict(mine) == {"product": product_id, "sale": sale, "stock": 5, "accepted": 5,
                            "logged": 2, "published": 1, "running": 1, "failed": 0, "lag": 1,
                            "pending": 2, "dead_letters": 1, "orders_per_s": 0.2,
                            "waiting": 0, "handed_out": 0, "released": 0}


def test_stats_watch_redraws_until_interrupted(settings):
    with tempfile.TemporaryFile() as out:
        # A runner started in the background inherits SIGINT ignored, and Python keeps an
        # ignored SIGINT ignored: give the child the default a terminal's Ctrl-C would meet.
        proc = subprocess.Popen([SECKILL, "stats", "--watch", "0.3"], env=engine_env(settings),
                                stdout=out, stderr=subprocess.PIPE, preexec_fn=_default_sigint)

        def redrawn_or_exited() -> bool:
            return _redraws(out) >= 2 or proc.poll() is not None

        try:
            wait_until(redrawn_or_exited, 20, "two redraws", interval=0.1)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(10)
        assert _redraws(out) >= 2, proc.stderr.read()
        assert code == 130  # interrupted: the command line's code for Ctrl-C


def test_stats_json_is_one_array_per_sample(settings):
    done = seckill(settings, "stats", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []  # this test's prefix has no sales


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _redraws(out) -> int:
    out.seek(0)
    return out.read().count(b"(every 0.3s, Ctrl-C to stop)")


def figures(**counts: int) -> dict:
    zero = {"accepted": 0, "logged": 0, "published": 0, "running": 0, "failed": 0, "lag": 0,
            "pending": 0, "dead_letters": 0, "waiting": 0, "handed_out": 0, "released": 0}
    return {**zero, **counts, "sale": None}


def seckill_json(settings) -> list[dict]:
    done = seckill(settings, "stats", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _mine(stats: list[dict], pid: int) -> dict:
    (mine,) = [s for s in stats if s["product"] == pid]
    return {k: v for k, v in mine.items() if k not in ("product", "stock", "orders_per_s")}


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
