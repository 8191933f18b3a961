"""`seckill dlq replay`: by entry ID, by --reason, and a letter that cannot be replayed."""

from __future__ import annotations

import json
import subprocess

import pytest
from support import add_products, announce, log_rows

from engine.keys import Keys
from engine.testing.processes import SECKILL, EngineProcess, engine_env
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(120)


def seckill(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SECKILL, *args], env=engine_env(settings), capture_output=True,
                          text=True, timeout=60)


async def dead_letter(redis, keys: Keys, pid: int, order_id: str, reason: str,
                      fields: dict[str, str] | None) -> str:
    """A dead letter as the engine writes it (settle.dlq_fields)."""
    entry = {"id": order_id, "reason": reason, "detail": "test", "worker": "w-0", "at": "0",
             "fields": json.dumps(fields if fields is not None else {})}
    return (await redis.xadd(keys.dlq(pid), entry)).decode()


async def stream(redis, keys: Keys, pid: int) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _, f in await redis.xrange(keys.stream(pid))]


async def dlq_ids(redis, keys: Keys, pid: int) -> list[str]:
    return [i.decode() for i, _ in await redis.xrange(keys.dlq(pid))]


async def test_replay_by_id_and_by_reason(settings, redis, product_id):
    pid = product_id
    keys = Keys(settings.key_prefix)
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    a = await dead_letter(redis, keys, pid, "1000-1", "unknown_product",
                          {"uid": "11", "ts": "1", "sale": "s", "slot": "1"})
    b = await dead_letter(redis, keys, pid, "1000-2", "too_many_deliveries",
                          {"uid": "12", "ts": "1", "sale": "s", "slot": "2"})
    c = await dead_letter(redis, keys, pid, "1000-3", "unknown_product",
                          {"uid": "13", "ts": "1", "sale": "s", "slot": "3"})

    by_id = seckill(settings, "dlq", "replay", "--product", str(pid), b)
    assert by_id.returncode == 0, by_id.stderr
    assert "replayed 1 dead letters" in by_id.stdout
    assert await stream(redis, keys, pid) == [
        {"uid": "12", "ts": "1", "sale": "s", "slot": "2", "orig": "1000-2"}]
    assert await dlq_ids(redis, keys, pid) == [a, c]

    by_reason = seckill(settings, "dlq", "replay", "--product", str(pid),
                        "--reason", "unknown_product")
    assert by_reason.returncode == 0, by_reason.stderr
    assert "replayed 2 dead letters" in by_reason.stdout
    replayed = await stream(redis, keys, pid)
    assert sorted((e["uid"], e["orig"]) for e in replayed) == [
        ("11", "1000-1"), ("12", "1000-2"), ("13", "1000-3")]
    assert await dlq_ids(redis, keys, pid) == []

    # the engine logs each replay under its original ID: one row per order
    engine = EngineProcess(settings, workers=1)
    try:
        async def logged() -> bool:
            return len(await log_rows(settings, [pid])) == 3
        await wait_for(logged, 60, "the three replays logged")
    finally:
        engine.stop()
    rows = await log_rows(settings, [pid])
    assert sorted((r["user_id"], r["stream_id"]) for r in rows) == [
        (11, "1000-1"), (12, "1000-2"), (13, "1000-3")]


@pytest.mark.parametrize("bad_fields", [{"ts": "1", "sale": "s", "slot": "2"}, None],
                         ids=["no-uid", "no-fields"])
async def test_a_letter_without_uid_fails_clearly_and_nothing_is_replayed(
        settings, redis, product_id, bad_fields):
    pid = product_id
    keys = Keys(settings.key_prefix)
    await announce(redis, keys, pid)
    good = await dead_letter(redis, keys, pid, "1000-1", "unknown_product",
                             {"uid": "11", "ts": "1"})
    bad = await dead_letter(redis, keys, pid, "1000-2", "unknown_product", bad_fields)
    if bad_fields is None:  # fields that are not even JSON
        await redis.xdel(keys.dlq(pid), bad)
        bad = (await redis.xadd(keys.dlq(pid), {"id": "1000-2", "reason": "unknown_product",
                                                "fields": "not json"})).decode()
    later = await dead_letter(redis, keys, pid, "1000-3", "unknown_product",
                              {"uid": "13", "ts": "1"})

    for selection in ([good, bad, later], ["--all"], ["--reason", "unknown_product"]):
        refused = seckill(settings, "dlq", "replay", "--product", str(pid), *selection)
        assert refused.returncode == 2, (selection, refused.stdout, refused.stderr)
        assert f"dead letter {bad} has no" in refused.stderr
        assert "replayed" not in refused.stdout
        assert "Traceback" not in refused.stderr
        assert await stream(redis, keys, pid) == [], f"{selection} half replayed"
        assert await dlq_ids(redis, keys, pid) == [good, bad, later]

    # the others are still replayable by name
    ok = seckill(settings, "dlq", "replay", "--product", str(pid), good, later)
    assert ok.returncode == 0 and "replayed 2 dead letters" in ok.stdout
    assert [e["orig"] for e in await stream(redis, keys, pid)] == ["1000-1", "1000-3"]
    assert await dlq_ids(redis, keys, pid) == [bad]
