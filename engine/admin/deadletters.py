"""`seckill dlq list|show|replay|drop --product ID`: dead letters, looked at and re-driven.

A replay re-adds the original fields to the order stream with `orig` set to
the original stream ID, so the engine logs it under that ID: still one row
per order, whichever way it came back. The dead letter is removed only
after the replay was added.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from redis.asyncio import Redis

from engine.config import Settings
from engine.connections import connect_redis
from engine.errors import InvalidInput
from engine.keys import Keys


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def describe(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    out = {_text(k): _text(v) for k, v in fields.items()}
    out["dlq_id"] = _text(entry_id)
    try:
        out["fields"] = orjson.loads(fields.get(b"fields", b"{}"))
    except orjson.JSONDecodeError:
        pass
    return out


async def entries(redis: Redis, keys: Keys, pid: int, ids: list[str] | None = None,
                  reason: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    found: list[Any] = []
    if ids:
        for i in ids:
            found += await redis.xrange(keys.dlq(pid), min=i, max=i) or []
    else:
        found = await redis.xrevrange(keys.dlq(pid), count=limit) or []
    out = [describe(eid, f) for eid, f in found]
    return [e for e in out if reason is None or e.get("reason") == reason]


def replay_fields(letter: dict[str, Any]) -> dict[str, str]:
    original = letter.get("fields")
    if not isinstance(original, dict):
        raise InvalidInput(f"dead letter {letter['dlq_id']} has no readable fields to replay")
    fields = {k: str(v) for k, v in original.items() if k != "orig"}
    if "uid" not in fields:
        raise InvalidInput(f"dead letter {letter['dlq_id']} has no uid to replay; nothing "
                           "was replayed (drop it, or name the other entries)")
    fields["orig"] = letter["id"]
    return fields


async def replay(redis: Redis, keys: Keys, pid: int, letters: list[dict[str, Any]]) -> int:
    """Every letter is checked before any is replayed, and all go in one MULTI/EXEC:
    a letter that cannot be replayed leaves every one where it was."""
    planned = [(letter["dlq_id"], replay_fields(letter)) for letter in letters]
    if not planned:
        return 0
    pipe = redis.pipeline(transaction=True)
    for dlq_id, fields in planned:
        pipe.xadd(keys.stream(pid), fields)  # type: ignore[arg-type]
        pipe.xdel(keys.dlq(pid), dlq_id)
    await pipe.execute()
    return len(planned)


async def dlq_command(settings: Settings, action: str, product_id: int, ids: list[str],
                      *, reason: str | None = None, limit: int = 20, all_: bool = False) -> int:
    keys = Keys(settings.key_prefix)
    redis = await connect_redis(settings)
    try:
        if action == "list":
            for e in await entries(redis, keys, product_id, reason=reason, limit=limit):
                at = dt.datetime.fromtimestamp(int(e.get("at", 0)) / 1000, dt.UTC)
                print(f"{e['dlq_id']}  order {e.get('id')}  {at:%Y-%m-%d %H:%M:%S}  "
                      f"{e.get('reason')}: {e.get('detail')}")
            return 0
        if not ids and not all_ and reason is None:
            raise InvalidInput(f"dlq {action}: name entry IDs or use --all (or --reason)")
        chosen = await entries(redis, keys, product_id, None if all_ else ids, reason)
        if action == "show":
            for e in chosen:
                print(orjson.dumps(e, option=orjson.OPT_INDENT_2).decode())
        elif action == "replay":
            print(f"replayed {await replay(redis, keys, product_id, chosen)} dead letters")
        elif action == "drop":
            if chosen:
                await redis.xdel(keys.dlq(product_id), *[e["dlq_id"] for e in chosen])
            print(f"dropped {len(chosen)} dead letters")
        return 0
    finally:
        await redis.aclose()
