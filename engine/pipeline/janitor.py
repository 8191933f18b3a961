"""Reclaiming entries that a dead or stuck consumer left pending.

A worker that dies with entries in flight leaves them in its pending list;
if its slot is respawned it re-reads them itself, but if the pool shrank or
the host is gone nobody would. The janitor XAUTOCLAIMs entries idle longer
than `claim_idle_ms` (far longer than a batch takes; workers retrying a
batch keep their entries fresh) and feeds them to the same pipeline. It also
finds order streams created by hand (`XADD stream:seckill:{1001} * ...`)
that no `sale open` announced.

A host that is gone for good leaves its consumers in every group: once the janitor
took their entries, they hold nothing; once they have also been idle longer than
`claim_idle_ms` (a live worker touches its consumer at every read, at least once per
`block_ms`) they are deleted, so XINFO and the consumer gauges show live hosts only.
The delete is a script that checks again, atomically, that the consumer still holds
nothing and is still idle: XGROUP DELCONSUMER drops the consumer's pending entries
with it, and a worker cut off from Redis (a blackhole) looks idle until the moment it
reads a batch, so a delete decided on an older XINFO could drop a batch just read,
which nobody would ever redeliver.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from engine.keys import DLQ_SUFFIX, GROUP, Keys
from engine.pipeline.orders import DeadLetter, Entry
from engine.pipeline.reader import ensure_group
from engine.pipeline.redelivery import too_often_delivered

log = logging.getLogger("seckill.janitor")

# KEYS[1] stream; ARGV: group, consumer, idle ms. 1 if deleted, 0 if it holds entries,
# was active since, or is gone.
DELETE_IF_IDLE = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""


class Janitor:
    def __init__(self, redis: Redis, keys: Keys, consumer: str, *, idle_ms: int, count: int,
                 max_deliveries: int) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.idle_ms = idle_ms
        self.count = count
        self.max_deliveries = max_deliveries

    async def reclaim(self, streams: list[bytes]) -> tuple[list[Entry], list[DeadLetter]]:
        """What every stream holds pending on idle consumers. The first XAUTOCLAIM of
        every stream goes in one pipeline (a thousand sales: one round trip, not a
        thousand); a stream with more to claim pages on by itself."""
        entries: list[Entry] = []
        dead: list[DeadLetter] = []
        if not streams:
            return entries, dead
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xautoclaim(stream, GROUP, self.consumer, self.idle_ms, start_id="0-0",
                            count=self.count)
        replies = await pipe.execute(raise_on_error=False)
        failed = [(s, r) for s, r in zip(streams, replies, strict=True)
                  if isinstance(r, BaseException)]
        if failed:  # the others' claims are taken: only these wait for the next pass
            log.warning("reclaiming %d of %d streams failed, first %s: %s", len(failed),
                        len(streams), _text(failed[0][0]), failed[0][1],
                        extra={"event": "reclaim_failed", "streams": len(failed)})
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            if reply[1] or reply[0] not in (b"0-0", "0-0"):
                e, d = await self._reclaim_stream(stream, reply)
                entries += e
                dead += d
        return entries, dead

    async def _reclaim_stream(self, stream: bytes, reply: Any
                              ) -> tuple[list[Entry], list[DeadLetter]]:
        """The entries of `stream`'s first XAUTOCLAIM `reply`, and of the pages after."""
        entries: list[Entry] = []
        dead: list[DeadLetter] = []
        while True:
            cursor, items = reply[0], [i for i in reply[1] if i[0] is not None]
            letters = await too_often_delivered(self.redis, self.keys, stream, items,
                                                self.consumer, self.max_deliveries)
            dead += letters.values()
            entries += [Entry(stream, raw_id.decode(), fields) for raw_id, fields in items
                        if raw_id not in letters]
            if cursor in (b"0-0", "0-0") or len(entries) + len(dead) >= self.count:
                return entries, dead
            reply = await self.redis.xautoclaim(stream, GROUP, self.consumer, self.idle_ms,
                                                start_id=cursor, count=self.count)

    async def forget_gone_consumers(self, streams: list[bytes]) -> int:
        """Delete consumers holding nothing and idle over `idle_ms`; returns how many."""
        gone = await self.delete_if_idle(await self.idle_consumers(streams))
        if gone:
            log.info("deleted %d idle consumers holding nothing: %s", len(gone),
                     ", ".join(sorted({_text(n) for _, n in gone})),
                     extra={"event": "consumers_deleted", "consumers": len(gone)})
        return len(gone)

    async def idle_consumers(self, streams: list[bytes]) -> list[tuple[bytes, bytes | str]]:
        """(stream, consumer) of other consumers that held nothing and were idle over
        `idle_ms` when asked: candidates, checked again by `delete_if_idle`."""
        if not streams:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_consumers(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
        return [(stream, c["name"]) for stream, consumers in zip(streams, replies, strict=True)
                if not isinstance(consumers, BaseException) for c in consumers
                if int(c["pending"]) == 0 and int(c["idle"]) > self.idle_ms
                and _text(c["name"]) != self.consumer]

    async def delete_if_idle(self, candidates: list[tuple[bytes, bytes | str]]
                             ) -> list[tuple[bytes, bytes | str]]:
        """Delete each candidate that still holds nothing and is still idle, checked and
        deleted in one script; returns those deleted."""
        deleted = []
        for stream, name in candidates:
            if await self.redis.eval(DELETE_IF_IDLE, 1, stream, GROUP, name,
                                     self.idle_ms):
                deleted.append((stream, name))
        return deleted

    async def find_hand_made_streams(self) -> int:
        """Register order streams nobody announced; returns how many were added."""
        added = 0
        async for key in self.redis.scan_iter(match=self.keys.stream_pattern, count=1000,
                                              _type="stream"):
            name = key.decode() if isinstance(key, bytes) else key
            if name.endswith(DLQ_SUFFIX):
                continue
            pid = self.keys.product_of_stream(name)
            if pid is None:
                continue
            if await self.redis.sadd(self.keys.streams, pid):
                await ensure_group(self.redis, name)
                added += 1
        return added


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
