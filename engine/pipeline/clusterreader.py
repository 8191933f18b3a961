"""The reader of a Redis Cluster: the streams read per slot, idle slots left alone.

One command cannot name keys of two slots (CROSSSLOT), so the streams are grouped by
slot and read with one non-blocking XREADGROUP per slot, sent as one pipeline (one
round trip per node, the nodes in parallel). Between sweeps of every slot (at most one
per `block_ms`) only the slots that had entries last time are read; when nothing came,
the one blocking wait is an XREADGROUP BLOCK on the slot that had orders last, up to
the next sweep: an idle engine sleeps, a busy sale wakes it at once, and a sale that
starts elsewhere is seen within `block_ms`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError, SlotNotCoveredError

from engine.errors import one_line
from engine.keys import GROUP, Keys
from engine.pipeline.reader import MIN_PER_STREAM, StreamReader, ensure_group, is_nogroup

log = logging.getLogger("seckill.reader")

# Busy streams with a backlog: entries read (and settled) per slot at once.
DEEP_PER_STREAM = 32

# Which of ARGV[2..] (streams on the node the call is sent to, of any slots) hold
# entries the group ARGV[1] has not delivered yet; 1-based indexes. Redis refuses
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

BySlot = dict[int, dict[bytes, bytes]]  # slot -> its streams and their cursors
NodeStreams = list[tuple[Any, list[bytes]]]  # (master, its streams)


class ClusterReader(StreamReader):
    def __init__(self, redis: Redis, keys: Keys, consumer: str, batch_size: int,
                 block_ms: int, max_deliveries: int) -> None:
        super().__init__(redis, keys, consumer, batch_size, block_ms, max_deliveries)
        self._slots: dict[bytes, int] = {}  # the slot of each stream
        self._hot: list[int] = []  # slots that had entries at the last read
        self._last_hot: int | None = None  # the slot to block on when idle
        self._next_sweep = 0.0  # when the probe runs again
        self._fill = float(batch_size)  # entries per busy slot at the last read
        self._groups: BySlot | None = None
        self._grouped = 0  # how many streams _groups holds
        self._probe_warned = False
        self._probes: tuple[NodeStreams, list[int]] | None = None
        self._probed = 0  # how many streams _probes holds

    async def _fetch(self, count: int, recovering: bool) -> list:
        """A share of the busy slots (every slot while recovering), the probe's findings
        added at most once per `block_ms`, then one blocking wait if nothing came."""
        by_slot = self._by_slot(recovering)
        if recovering:
            return await self._read_every_slot(by_slot, count)
        if time.monotonic() >= self._next_sweep:
            await self._sweep(by_slot)
        if not self._hot:
            return await self._wait(by_slot, count)
        return await self._read_busy(by_slot, count)

    async def _read_every_slot(self, by_slot: BySlot, count: int) -> list:
        """Recovering: every slot at once; those that held entries are the busy ones."""
        self._next_sweep = time.monotonic() + self.block_ms / 1000
        reply = await self._read_groups(list(by_slot.values()), count)
        self._hot = sorted({self._slots[stream] for stream, items in reply if items})
        return reply

    async def _sweep(self, by_slot: BySlot) -> None:
        """Add the slots the probe finds entries in to the busy ones."""
        self._next_sweep = time.monotonic() + self.block_ms / 1000
        hot = set(self._hot)
        self._hot += [s for s in await self._probe(by_slot) if s not in hot]

    async def _read_busy(self, by_slot: BySlot, count: int) -> list:
        """This read's share of the busy slots; the slots it found empty are busy no more.
        If none of them held anything and no busy slot is left, wait."""
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

    async def _wait(self, by_slot: BySlot, count: int) -> list:
        """Nothing to read: one blocking XREADGROUP, on the slot that had orders last,
        until the next probe; a new order there wakes it at once."""
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

    def _by_slot(self, recovering: bool) -> BySlot:
        """The streams (and their cursors) grouped by slot; rebuilt when the cursors move
        or discovery adds streams, not on every read."""
        if recovering or self._groups is None or self._grouped != len(self.cursors):
            groups: BySlot = {}
            for stream, cursor in self.cursors.items():
                groups.setdefault(self._slot(stream), {})[stream] = cursor
            if recovering:
                return groups
            self._groups, self._grouped = groups, len(self.cursors)
        return self._groups

    def _slot(self, stream: bytes) -> int:
        """The slot of `stream`, computed once: every other use of `_slots` follows the
        grouping, which sees every stream discovery added."""
        slot = self._slots.get(stream)
        if slot is None:
            slot = self._slots[stream] = key_slot(stream)
        return slot

    async def _probe(self, by_slot: BySlot) -> list[int]:
        """The slots whose streams hold entries the group has not delivered.

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

    def _probe_groups(self, by_slot: BySlot) -> tuple[NodeStreams, list[int]]:
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
        """The master holding `slot`, named so that the client does not ask a node for
        the keys of every XREADGROUP (redis-py sends COMMAND GETKEYS, twice, for a
        command whose keys it cannot place: two round trips per slot per read).
        A stale table only costs a redirect: the client re-routes a MOVED reply, and a
        retried pipeline routes by itself. Unknown slot (table being reloaded): no hint."""
        try:
            return {"target_nodes": self.redis.nodes_manager.get_node_from_slot(slot)}  # type: ignore[attr-defined]
        except (SlotNotCoveredError, KeyError):
            return {}
