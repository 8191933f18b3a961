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
from redis.exceptions import ResponseError, SlotNotCoveredError

from engine.connections import is_cluster
from engine.errors import one_line
from engine.keys import GROUP, Keys
from engine.pipeline.orders import DeadLetter, Entry
from engine.pipeline.redelivery import too_often_delivered

log = logging.getLogger("seckill.reader")

NEW = b">"
MIN_PER_STREAM = 4
# Cluster, busy streams with a backlog: entries read (and settled) per slot at once.
DEEP_PER_STREAM = 32

# Cluster: which of ARGV[2..] (streams on the node the call is sent to, of any slots)
# hold entries the group ARGV[1] has not delivered yet; 1-based indexes. Redis refuses
# declared KEYS of two slots (CROSSSLOT) even with allow-cross-slot-keys, which only lets
# the script touch keys of any slot the node serves: the streams go as arguments (a slot
# that moved away fails the call with "non local key"). `lag` is what XINFO GROUPS says is
# undelivered (Redis 7.0+); when Redis cannot tell (nil), or the stream or its group is
# missing, the stream is reported and the read finds out.
PROBE = """#!lua flags=no-writes,allow-cross-slot-keys
local out = {}
for i = 2, #ARGV do
  local groups = redis.pcall('XINFO', 'GROUPS', ARGV[i])
  local lag = nil
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      for j = 1, #g, 2 do
        if g[j] == 'name' and g[j + 1] ~= ARGV[1] then break end
        if g[j] == 'lag' then lag = g[j + 1] end
      end
      if lag ~= nil then break end
    end
  end
  if lag ~= 0 then out[#out + 1] = i - 1 end
end
return out
"""


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
        self._next_sweep = 0.0  # cluster: when the probe runs again
        self._fill = float(batch_size)  # cluster: entries per busy slot at the last read
        self._groups: dict[int, dict[bytes, bytes]] | None = None  # cluster: by slot
        self._grouped = 0  # cluster: how many streams _groups holds
        self._probe_warned = False
        self._probes: tuple[list[tuple[Any, list[bytes]]], list[int]] | None = None
        self._probed = 0  # cluster: how many streams _probes holds

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
        """Cluster: a share of the busy slots (every slot while recovering), the probe's
        findings added at most once per `block_ms`, then one blocking wait if nothing came."""
        by_slot = self._by_slot(recovering)
        if recovering:
            self._next_sweep = time.monotonic() + self.block_ms / 1000
            reply = await self._read_groups(list(by_slot.values()), count)
            self._hot = sorted({self._slots[stream] for stream, items in reply if items})
            return reply
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.block_ms / 1000
            hot = set(self._hot)
            self._hot += [s for s in await self._probe(by_slot) if s not in hot]
        if not self._hot:
            return await self._wait(by_slot, count)
        take, count = self._share(count)
        reply = await self._read_groups([by_slot[s] for s in take], count)
        got = {self._slots[stream]: len(items) for stream, items in reply if items}
        self._hot = self._hot[len(take):] + [s for s in take if s in got]
        if got:
            self._fill = sum(got.values()) / len(got)
            self._last_hot = take[0] if take[0] in got else next(iter(got))
            return reply
        if self._hot:  # busy slots not read this time: the next read takes them
            return reply
        return await self._wait(by_slot, count)

    async def _wait(self, by_slot: dict[int, dict[bytes, bytes]], count: int) -> list:
        """Cluster, nothing to read: one blocking XREADGROUP, on the slot that had orders
        last, until the next probe; a new order there wakes it at once."""
        wait_ms = max(1, int((self._next_sweep - time.monotonic()) * 1000))
        slot = self._last_hot if self._last_hot in by_slot else next(iter(by_slot))
        reply = await self._read_groups([by_slot[slot]], count, block=wait_ms)
        if any(items for _, items in reply):
            self._hot = [slot]
        return reply

    def _share(self, count: int) -> tuple[list[int], int]:
        """The busy slots this read takes, in turn, and the COUNT for each.

        Each slot costs a command to read and a script call to settle, whatever it
        holds; the single Redis pays that per stream inside one command. When the busy
        streams filled their COUNT last time (a backlog), a read takes batch_size /
        DEEP_PER_STREAM of them with DEEP_PER_STREAM each, the next read the next ones:
        one batch stays about batch_size entries and each slot's cost is spread over
        many orders. When they held less (many sales, few orders each), every busy slot
        is read at once, as on the single Redis."""
        count = max(MIN_PER_STREAM, self.batch_size // len(self._hot))
        if self._fill < count:
            return list(self._hot), count
        count = max(count, DEEP_PER_STREAM)
        return self._hot[:max(1, self.batch_size // count)], count

    def _by_slot(self, recovering: bool) -> dict[int, dict[bytes, bytes]]:
        """The streams (and their cursors) grouped by slot; rebuilt when the cursors move
        or discovery adds streams, not on every read."""
        if recovering or self._groups is None or self._grouped != len(self.cursors):
            groups: dict[int, dict[bytes, bytes]] = {}
            for stream, cursor in self.cursors.items():
                groups.setdefault(self._slots[stream], {})[stream] = cursor
            if recovering:
                return groups
            self._groups, self._grouped = groups, len(self.cursors)
        return self._groups

    async def _probe(self, by_slot: dict[int, dict[bytes, bytes]]) -> list[int]:
        """Cluster: the slots whose streams hold entries the group has not delivered.

        One script call per master (PROBE, allowed across the slots of its node) instead
        of an XREADGROUP per slot: an idle engine with a thousand sales sends a few
        commands per `block_ms`, not a thousand. A master whose call fails (a slot moving
        during a reshard, a failover, a Redis older than 7.0) has every one of its slots
        reported, so the read tries them all, as it would without the probe."""
        probes = self._probes
        if probes is None or self._probed != len(self.cursors):
            probes = self._probe_groups(by_slot)
        nodes, unrouted = probes
        self._probes, self._probed = (None if unrouted else probes), len(self.cursors)
        pipe = self.redis.pipeline(transaction=False)
        for node, names in nodes:
            pipe.execute_command("EVAL", PROBE, 0, GROUP, *names, target_nodes=node)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception:
            self._probes = None  # a node gone (failover): group again by the new table
            raise
        found = list(unrouted)
        for (_, names), reply in zip(nodes, replies, strict=True):
            if isinstance(reply, BaseException):
                self._probe_failed(reply)
                found += {self._slots[s] for s in names}
            else:
                found += {self._slots[names[i - 1]] for i in reply}
        return found

    def _probe_groups(self, by_slot: dict[int, dict[bytes, bytes]]
                      ) -> tuple[list[tuple[Any, list[bytes]]], list[int]]:
        """The streams of each master, as the client's slot table has them, and the slots
        it has no master for. Kept until a stream is added or a probe fails: a slot that
        moved makes its master's call fail (MOVED), and that regroups."""
        nodes: dict[str, tuple[Any, list[bytes]]] = {}
        unrouted: list[int] = []
        for slot, streams in by_slot.items():
            target = self._route(slot)
            if not target:
                unrouted.append(slot)
                continue
            node = target["target_nodes"]
            nodes.setdefault(node.name, (node, []))[1].extend(streams)
        return list(nodes.values()), unrouted

    def _probe_failed(self, exc: BaseException) -> None:
        self._probes = None
        if not self._probe_warned:
            self._probe_warned = True
            log.warning("probing the streams failed (%s); reading every slot instead",
                        one_line(exc), extra={"event": "probe_failed"})

    async def _read_groups(self, groups: list[dict[bytes, bytes]], count: int,
                           block: int | None = None) -> list:
        """One XREADGROUP per group of same-slot streams, in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for streams in groups:
            args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", count]
            if block is not None:
                args += ["BLOCK", block]
            args += ["STREAMS", *streams, *streams.values()]
            pipe.execute_command(*args, **self._route(self._slots[next(iter(streams))]))
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

    def _route(self, slot: int) -> dict[str, Any]:
        """Cluster: the master holding `slot`, named so that the client does not ask a
        node for the keys of every XREADGROUP (redis-py sends COMMAND GETKEYS, twice, for
        a command whose keys it cannot place: two round trips per slot per read).
        A stale table only costs a redirect: the client re-routes a MOVED reply, and a
        retried pipeline routes by itself. Unknown slot (table being reloaded): no hint."""
        try:
            return {"target_nodes": self.redis.nodes_manager.get_node_from_slot(slot)}  # type: ignore[attr-defined]
        except (SlotNotCoveredError, KeyError):
            return {}

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
                old = await too_often_delivered(self.redis, self.keys, stream, items,
                                                self.consumer, self.max_deliveries)
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
