"""Reading every open sale's stream with one XREADGROUP call (per slot on a cluster).

A worker first re-reads its own pending entries (cursor `0`, then the last ID
seen) and switches a stream to `>` once nothing of its own is left there, so
a respawned worker in the same slot finishes what its predecessor held.
The per-stream COUNT adapts to how many streams actually have orders, so one
busy sale among a thousand idle ones still gets full batches.

On a Redis Cluster one command cannot name keys of two slots (CROSSSLOT), so the
streams are grouped by slot and read with one non-blocking XREADGROUP per slot, sent
as one pipeline (one round trip per node, the nodes in parallel). Between sweeps of
every slot (at most one per `block_ms`) only the slots that had entries last time are
read; when nothing came, the one blocking wait is an XREADGROUP BLOCK on the slot
that had orders last, up to the next full sweep: an idle engine sleeps, a busy sale
wakes it at once, and a sale that starts elsewhere is seen within `block_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from engine.connections import is_cluster
from engine.keys import GROUP, Keys
from engine.pipeline.orders import TOO_MANY_DELIVERIES, DeadLetter, Entry
from engine.pipeline.settle import last_errors

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


class StreamReader:
    def __init__(self, redis: Redis, keys: Keys, consumer: str, batch_size: int,
                 block_ms: int, max_deliveries: int) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.cursors: dict[bytes, bytes] = {}
        self._found = asyncio.Event()  # set once discovery knows at least one stream
        # Streams that had entries at the last read; until we know, assume all of them,
        # so one read never returns more than about one batch.
        self._active = 1 << 30
        self.cluster = is_cluster(redis)
        self._slots: dict[bytes, int] = {}  # cluster: the slot of each stream
        self._hot: list[int] = []  # cluster: slots that had entries at the last read
        self._last_hot: int | None = None  # cluster: the slot to block on when idle
        self._next_sweep = 0.0  # cluster: when every slot is read again

    async def discover(self) -> int:
        """Pick up streams of newly opened sales; returns how many were new."""
        members = await self.redis.smembers(self.keys.streams)
        new = 0
        for pid in members:
            stream = self.keys.stream(int(pid)).encode()
            if stream not in self.cursors:
                await ensure_group(self.redis, stream)
                self.cursors[stream] = b"0"
                self._slots[stream] = key_slot(stream)
                new += 1
        if new:
            self._found.set()
            log.info("reading %d streams (%d new)", len(self.cursors), new,
                     extra={"event": "streams_discovered", "streams": len(self.cursors)})
        return new

    async def read(self) -> tuple[list[Entry], list[DeadLetter]]:
        """One XREADGROUP over all streams: entries to process, and entries to dead-letter
        because they were delivered too often (a worker keeps dying on them)."""
        if not self.cursors:
            await self._idle()
            return [], []
        # at least a few entries per busy stream: a read and its acknowledgements cost
        # something per stream, and one entry per stream would pay it for every order
        count = max(MIN_PER_STREAM, self.batch_size // min(self._active, len(self.cursors)))
        recovering = any(c != NEW for c in self.cursors.values())
        if self.cluster:
            return await self._collect(await self._read_slots(count, recovering))
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, self.cursors, count=count,  # type: ignore[arg-type]
                block=None if recovering else self.block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            for stream in self.cursors:
                await ensure_group(self.redis, stream)
            return [], []
        return await self._collect(reply or [])  # type: ignore[arg-type]

    async def _read_slots(self, count: int, recovering: bool) -> list:
        """Cluster: the hot slots (or every slot, when due), then one blocking wait if
        nothing came."""
        by_slot: dict[int, dict[bytes, bytes]] = {}
        for stream, cursor in self.cursors.items():
            by_slot.setdefault(self._slots[stream], {})[stream] = cursor
        now = time.monotonic()
        sweep = recovering or not self._hot or now >= self._next_sweep
        slots = list(by_slot) if sweep else [s for s in self._hot if s in by_slot]
        if sweep:
            self._next_sweep = now + self.block_ms / 1000
        reply = await self._read_groups([by_slot[s] for s in slots], count)
        self._hot = sorted({self._slots[stream] for stream, items in reply if items})
        if self._hot:
            self._last_hot = self._hot[0]
            return reply
        if recovering:
            return reply
        # one blocking wait, on the slot that had orders last, until the next sweep
        wait_ms = max(1, int((self._next_sweep - time.monotonic()) * 1000))
        slot = self._last_hot if self._last_hot in by_slot else next(iter(by_slot))
        return await self._read_groups([by_slot[slot]], count, block=wait_ms)

    async def _read_groups(self, groups: list[dict[bytes, bytes]], count: int,
                           block: int | None = None) -> list:
        """One XREADGROUP per group of same-slot streams, in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for streams in groups:
            pipe.xreadgroup(GROUP, self.consumer, streams, count=count,  # type: ignore[arg-type]
                            block=block)
        replies = await pipe.execute(raise_on_error=False)
        out: list = []
        for streams, reply in zip(groups, replies, strict=True):
            if isinstance(reply, ResponseError) and is_nogroup(reply):
                for stream in streams:
                    await ensure_group(self.redis, stream)
            elif isinstance(reply, BaseException):
                raise reply
            elif reply:
                out.extend(reply)
        return out

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
        for stream, items in reply:
            cursor = self.cursors.get(stream, NEW)
            if items:
                active += 1
            if cursor != NEW:
                self.cursors[stream] = items[-1][0] if items else NEW
                old = await self._too_often_delivered(stream, items)
            else:
                old = {}
            for raw_id, fields in items:
                stream_id = raw_id.decode()
                if raw_id in old:
                    dead.append(old[raw_id])
                elif fields is None:  # deleted from the stream while pending: nothing to do
                    dead.append(DeadLetter(stream, stream_id, self.keys.product_of_stream(
                        stream.decode()), {}, "deleted", "entry deleted from the stream"))
                else:
                    entries.append(Entry(stream, stream_id, fields))
        self._active = active or len(self.cursors)
        return entries, dead

    async def _too_often_delivered(self, stream: bytes,
                                   items: list) -> dict[bytes, DeadLetter]:
        if not items:
            return {}
        counts = await delivery_counts(self.redis, stream, [raw_id for raw_id, _ in items],
                                       self.consumer)
        return await poison_letters(self.redis, self.keys, stream, items, counts,
                                    self.max_deliveries)


async def delivery_counts(redis: Redis, stream: bytes, ids: list[bytes],
                          consumer: str) -> dict[bytes, int]:
    """Delivery count of each of `ids` (in stream order) pending on `consumer`.

    The consumer's pending list between the first and the last ID may hold other
    entries too (batches in flight, entries claimed earlier), so one page of
    len(ids) rows can stop short; we page on until every ID is found or the range
    is exhausted. Only recovery and the janitor call this, never the hot path.
    """
    if not ids:
        return {}
    wanted = set(ids)
    counts: dict[bytes, int] = {}
    page = len(ids) + 100
    low: bytes = ids[0]
    while True:
        rows: list[dict[str, Any]] = await redis.xpending_range(  # type: ignore[assignment]
            stream, GROUP, min=low, max=ids[-1], count=page, consumername=consumer)
        for row in rows:
            if row["message_id"] in wanted:
                counts[row["message_id"]] = int(row["times_delivered"])
        if len(rows) < page or len(counts) == len(wanted):
            return counts
        low = b"(" + rows[-1]["message_id"]


async def poison_letters(redis: Redis, keys: Keys, stream: bytes, items: list,
                         counts: dict[bytes, int], limit: int) -> dict[bytes, DeadLetter]:
    """Dead letters for the entries delivered more than `limit` times, with their last error."""
    over = [(raw_id, fields) for raw_id, fields in items if counts.get(raw_id, 0) > limit]
    if not over:
        return {}
    errors = await last_errors(redis, keys, stream, [raw_id for raw_id, _ in over])
    return {raw_id: poison(keys, stream, raw_id, fields, counts[raw_id], errors.get(raw_id))
            for raw_id, fields in over}


def poison(keys: Keys, stream: bytes, raw_id: bytes, fields: dict | None, deliveries: int,
           last_error: str | None = None) -> DeadLetter:
    detail = f"delivered {deliveries} times without being acknowledged"
    if last_error:
        detail += f"; last error: {last_error}"
    return DeadLetter(stream, raw_id.decode(), keys.product_of_stream(stream.decode()),
                      fields or {}, TOO_MANY_DELIVERIES, detail,
                      {"deliveries": str(deliveries), "last_error": last_error or ""})
