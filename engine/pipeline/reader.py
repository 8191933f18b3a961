"""The read stage of a batch: what every stream reader does, one Redis or a cluster.

A worker first re-reads its own pending entries (cursor `0`, then the last ID
seen) and switches a stream to `>` once nothing of its own is left there, so
a respawned worker in the same slot finishes what its predecessor held; an
entry re-read that way too often becomes a dead letter (`redelivery`).
The per-stream COUNT adapts to how many streams actually have orders, so one
busy sale among a thousand idle ones still gets full batches.

How the streams are fetched is the subclass's: `RedisReader` (one server) or
`ClusterReader` (per slot); `autoreader.open_reader` picks one at start.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.keys import GROUP, Keys
from engine.pipeline.orders import DeadLetter, Entry
from engine.pipeline.redelivery import too_often_delivered

log = logging.getLogger("seckill.reader")

NEW = b">"
MIN_PER_STREAM = 4


def is_nogroup(exc: ResponseError) -> bool:
    # redis-py has no class for it; the error code is the reply's first word.
    return str(exc).startswith("NOGROUP")


async def ensure_group(redis: Redis, stream: str | bytes) -> None:
    """Create the consumer group from the stream's start (entries added by hand count)."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamReader(ABC):
    """Reads every open sale's stream for one consumer; `_fetch` is the subclass's."""

    def __init__(self, redis: Redis, keys: Keys, consumer: str, batch_size: int,
                 block_ms: int, max_deliveries: int) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.cursors: dict[bytes, bytes] = {}
        self._members: set[bytes | str] = set()  # of the set of streams, those discovered
        self._found = asyncio.Event()  # set once discovery knows at least one stream
        # Streams that had entries at the last read; until we know, assume all of them,
        # so one read never returns more than about one batch.
        self._active = 1 << 30

    # True when `_fetch` gives each entry's fields as the flat [name, value, ...] list of
    # the wire (RedisReader's raw reply); False when redis-py made them a dict already.
    flat_fields = False

    async def discover(self) -> int:
        """Pick up streams of newly opened sales; returns how many were new."""
        members = await self.redis.smembers(self.keys.streams)
        new = 0
        # a thousand sales, every discovery_interval: only the members not seen before
        for pid in members - self._members:  # type: ignore[operator]
            stream = self.keys.stream(int(pid)).encode()
            if stream not in self.cursors:
                await ensure_group(self.redis, stream)
                self.cursors[stream] = b"0"
                new += 1
            self._members.add(pid)
        if new:
            self._found.set()
            log.info("reading %d streams (%d new)", len(self.cursors), new,
                     extra={"event": "streams_discovered", "streams": len(self.cursors)})
        return new

    async def read(self) -> tuple[list[Entry], list[DeadLetter]]:
        """One read over all streams: entries to process, and entries to dead-letter
        because they were delivered too often (a worker keeps dying on them)."""
        if not self.cursors:
            await self._idle()
            return [], []
        # at least a few entries per busy stream: a read and its acknowledgements cost
        # something per stream, and one entry per stream would pay it for every order
        count = max(MIN_PER_STREAM, self.batch_size // min(self._active, len(self.cursors)))
        recovering = any(c != NEW for c in self.cursors.values())
        reply = await self._fetch(count, recovering)
        if reply is None:
            return [], []
        return await self._collect(reply)

    @abstractmethod
    async def _fetch(self, count: int, recovering: bool) -> list | None:
        """The XREADGROUP reply, [(stream, [(id, fields)...])...], or None when nothing
        was read (the group was gone and has been created again)."""

    async def _idle(self) -> None:
        """No sale yet: wait as long as a blocking read would, or until discovery finds
        one, so an idle worker sleeps instead of spinning through empty reads."""
        try:
            await asyncio.wait_for(self._found.wait(), self.block_ms / 1000)
        except TimeoutError:
            pass

    async def _collect(self, reply: list) -> tuple[list[Entry], list[DeadLetter]]:
        entries: list[Entry] = []
        dead: list[DeadLetter] = []
        active = 0
        cursors = self.cursors
        flat = self.flat_fields
        for stream, items in reply:
            if items:
                active += 1
            if flat:  # [id, [name, value, ...]]: the dict made here, once
                # (fields None: deleted from the stream while pending; dead-lettered below)
                batch = [Entry(stream, raw_id.decode(), None if f is None  # type: ignore[arg-type]
                               else dict(zip(i := iter(f), i, strict=False)))
                         for raw_id, f in items]
            else:
                batch = [Entry(stream, raw_id.decode(), f) for raw_id, f in items]
            # new entries (the common case) need no look at the pending list
            if cursors.get(stream, NEW) == NEW and None not in [e.fields for e in batch]:
                entries += batch
                continue
            old = await self._advance(stream, [(raw_id, e.fields) for (raw_id, _), e
                                               in zip(items, batch, strict=True)])
            for raw_id, entry in zip((i[0] for i in items), batch, strict=True):
                if raw_id in old:
                    dead.append(old[raw_id])
                elif entry.fields is None:  # deleted from the stream while pending
                    dead.append(DeadLetter(stream, entry.stream_id, self.keys.product_of_stream(
                        stream.decode()), {}, "deleted", "entry deleted from the stream"))
                else:
                    entries.append(entry)
        self._active = active or len(self.cursors)
        return entries, dead

    async def _advance(self, stream: bytes, items: list) -> dict[bytes, DeadLetter]:
        """Recovering `stream`: move its cursor past `items` (to `>` once none are left)
        and return the dead letters of those delivered too often. New entries: nothing."""
        if self.cursors.get(stream, NEW) == NEW:
            return {}
        self.cursors[stream] = items[-1][0] if items else NEW
        return await too_often_delivered(self.redis, self.keys, stream, items, self.consumer,
                                         self.max_deliveries)
