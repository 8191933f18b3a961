"""The last stage of a batch: acknowledge what is done and set aside what never will be.

Dead letters are written and their entries acknowledged in the same
MULTI/EXEC as the batch's acknowledgements, so an entry is never both gone
from the pending list and missing from the dead-letter stream. A batch of many
streams is acknowledged by one script call (ACK_STREAMS) in that transaction, not
one XACK per stream. On a Redis
Cluster a transaction cannot span slots, so each product (one hash tag, one
slot) is settled by one script call of its own (atomic as MULTI is), and
the calls of a batch go in one pipeline: atomic per product, which is all the
invariant needs (an entry and its dead letter share the product's tag).

The common batch (no dead letter, no recorded error) is only acknowledged: that
needs no transaction, and its one command (XACK, or ACK_STREAMS for many streams)
is packed here and sent on a connection of the client's pool, because redis-py's
packer (an encoder call and a join per argument) was a twentieth of a worker's CPU
in the profile of issue 24.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine.connections import is_cluster
from engine.errors import ServiceUnavailable, one_line
from engine.keys import DLQ_SUFFIX, GROUP
from engine.pipeline.faults import FAULTS, MID_DEAD_LETTER
from engine.pipeline.orders import DeadLetter, Order, ids_by_stream
from engine.pipeline.redelivery import forget_errors


def dlq_fields(dead: DeadLetter, worker: str) -> dict[str, str | bytes]:
    """The dead-letter entry: the original ID and fields, why, who and when."""
    raw = {k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
           for k, v in dead.fields.items()}
    out: dict[str, str | bytes] = {
        "id": dead.stream_id,
        "reason": dead.reason,
        "detail": dead.detail,
        "fields": orjson.dumps(raw),
        "worker": worker,
        "at": str(int(time.time() * 1000)),
    }
    out.update(dead.extra)
    return out


async def settle(redis: Redis, done: list[Order], dead: list[DeadLetter], worker: str,
                 errors: Iterable[str] = ()) -> None:
    """XADD the dead letters and XACK everything in one transaction.

    `errors` are the error hashes (`redelivery.error_keys`) that may hold entries
    of this batch: their fields go with the acknowledgement, so the hash only ever
    holds entries that are still pending.
    """
    if not done and not dead:
        return
    if is_cluster(redis):
        await _settle_per_product(redis, done, dead, worker, errors)
        return
    errors = list(errors)
    if not dead and not errors:
        await acknowledge(redis, ids_by_stream(done))
        return
    pipe = redis.pipeline(transaction=True)
    for letter in dead:
        pipe.xadd(letter.stream + DLQ_SUFFIX.encode(), dlq_fields(letter, worker))  # type: ignore[arg-type]
    if dead and FAULTS.armed and FAULTS.reached(MID_DEAD_LETTER):
        await FAULTS.kill_mid_write(redis, pipe)
    by_stream = ids_by_stream([*done, *dead])
    if len(by_stream) == 1:
        [(stream, ids)] = by_stream.items()
        pipe.xack(stream, GROUP, *ids)
    else:
        pipe.eval(ACK_STREAMS, len(by_stream), *by_stream, *ack_args(by_stream))  # type: ignore[arg-type]
    forget_errors(pipe, errors, by_stream)
    await pipe.execute()


# Every stream's acknowledgements in one command (a single Redis takes keys of any slot):
# as one XACK per stream, a batch of a thousand sales cost the client a thousand
# commands to pack and a thousand replies to read, more than its orders did.
# KEYS: streams; ARGV: group, then per stream its ID count and its IDs.
ACK_STREAMS = """
local group, i = ARGV[1], 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  for s = i + 1, i + n, 500 do
    redis.call('XACK', KEYS[k], group, unpack(ARGV, s, math.min(s + 499, i + n)))
  end
  i = i + n + 1
end
return #KEYS
"""


def ack_args(by_stream: dict[bytes, list[str]]) -> list[str]:
    """ACK_STREAMS's ARGV for `by_stream` (its KEYS are the streams, in this order)."""
    args = [GROUP]
    for ids in by_stream.values():
        args.append(str(len(ids)))
        args += ids
    return args


_GROUP = GROUP.encode()
_XACK_HEAD = b"$4\r\nXACK\r\n"
_EVAL_HEAD = b"$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(ACK_STREAMS), ACK_STREAMS.encode())
_GROUP_ARG = b"$%d\r\n%s\r\n" % (len(_GROUP), _GROUP)
ACK_ATTEMPTS = 2  # a connection the server dropped while idle in the pool: once more


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulk_ids(ids: list[str]) -> bytes:
    return "".join([f"${len(i)}\r\n{i}\r\n" for i in ids]).encode()


def pack_xack(stream: bytes, ids: list[str]) -> bytes:
    """`XACK stream GROUP id...` in RESP, byte for byte what redis-py packs
    (tests/pipeline/test_settle.py); IDs are ASCII (`ms-seq`)."""
    return b"".join((b"*%d\r\n" % (len(ids) + 3), _XACK_HEAD, _bulk(stream), _GROUP_ARG,
                     _bulk_ids(ids)))


def pack_ack(by_stream: dict[bytes, list[str]]) -> bytes:
    """One command acknowledging every stream's IDs: an XACK for one stream, else one
    EVAL of ACK_STREAMS (byte for byte what redis-py packs for either)."""
    if len(by_stream) == 1:
        [(stream, ids)] = by_stream.items()
        return pack_xack(stream, ids)
    parts = [b"", _EVAL_HEAD, _bulk(b"%d" % len(by_stream))]
    parts += [_bulk(stream) for stream in by_stream]
    parts.append(_GROUP_ARG)
    count = 3 + len(by_stream) + 1
    for ids in by_stream.values():
        parts.append(_bulk(b"%d" % len(ids)))
        parts.append(_bulk_ids(ids))
        count += 1 + len(ids)
    parts[0] = b"*%d\r\n" % count
    return b"".join(parts)


async def acknowledge(redis: Redis, by_stream: dict[bytes, list[str]]) -> None:
    """Acknowledge the entry IDs of each stream in one command on one pooled connection.

    Acknowledging twice is harmless, so a connection that fails is dropped and the
    command is sent once more on another before the error goes to the batch."""
    payload = pack_ack(by_stream)
    pool = redis.connection_pool
    for attempt in range(1, ACK_ATTEMPTS + 1):
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(payload)
            await conn.read_response()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await conn.disconnect()
            if attempt == ACK_ATTEMPTS:
                raise
        except BaseException:  # an error reply or a cancel: replies may be left unread
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)


def hash_tag(key: str | bytes) -> str:
    """The `{...}` part of a key (what Redis Cluster hashes), or the whole key."""
    text = key.decode() if isinstance(key, bytes) else key
    start = text.find("{")
    end = text.find("}", start + 1)
    return text[start + 1:end] if 0 <= start < end - 1 else text


# One product's settlement on a cluster, atomic as a script is: dead letters added, then
# the entries acknowledged and their recorded errors dropped.
# KEYS: stream, dead-letter stream, error hashes...; ARGV: group, id count, ids...,
# letter count, then per letter its field/value pair count and the pairs.
SETTLE_PRODUCT = """
local group, n, i = ARGV[1], tonumber(ARGV[2]), 3
local ids = {}
for j = 1, n do ids[j] = ARGV[i]; i = i + 1 end
local letters = tonumber(ARGV[i]); i = i + 1
for _ = 1, letters do
  local fields, count = {}, tonumber(ARGV[i]) * 2
  for j = 1, count do fields[j] = ARGV[i + j] end
  i = i + count + 1
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
for s = 1, n, 500 do
  local last = math.min(s + 499, n)
  redis.call('XACK', KEYS[1], group, unpack(ids, s, last))
  for k = 3, #KEYS do redis.call('HDEL', KEYS[k], unpack(ids, s, last)) end
end
return n
"""


async def _settle_per_product(redis: Redis, done: list[Order], dead: list[DeadLetter],
                              worker: str, errors: Iterable[str]) -> None:
    """One script call per product (atomic, like the MULTI on one Redis), all of them in
    one pipeline: one round trip per node, however many products the batch holds.

    A RuntimeError the cluster client raises while a node goes away is reported as the
    outage it is (the batch retries; its entries stay pending)."""
    by_stream = ids_by_stream([*done, *dead])
    errors_of: dict[str, list[str]] = defaultdict(list)
    for key in errors:
        errors_of[hash_tag(key)].append(key)
    letters: dict[bytes, list[DeadLetter]] = defaultdict(list)
    for letter in dead:
        letters[letter.stream].append(letter)
    pipe = redis.pipeline(transaction=False)
    for stream, ids in by_stream.items():
        keys = [stream, stream + DLQ_SUFFIX.encode(), *errors_of.get(hash_tag(stream), ())]
        args: list[str | bytes] = [GROUP, str(len(ids)), *ids]
        mine = letters.get(stream, [])
        args.append(str(len(mine)))
        for letter in mine:
            fields = dlq_fields(letter, worker)
            args.append(str(len(fields)))
            for name, value in fields.items():
                args += [name, value]
        pipe.eval(SETTLE_PRODUCT, len(keys), *keys, *args)  # type: ignore[arg-type]
    try:
        await pipe.execute()
    except RuntimeError as exc:
        raise ServiceUnavailable(f"Redis Cluster: acknowledging {len(by_stream)} streams: "
                                 f"{one_line(exc)}") from exc
