"""Snowflake instance IDs from leased node IDs.

41 bits of milliseconds since a fixed epoch, 10 bits of node ID, 12 bits of
sequence. Two generators never share a node ID because node IDs are leased in
Redis (`SET ... NX PX`), renewed by compare-and-PEXPIRE, and a generator stops
issuing IDs *before* its lease could have expired in Redis: validity is
counted from the moment the renewal was sent, minus a safety margin.

The IDs stage of a batch (`assign_ids`) takes the IDs of a whole batch in one call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from engine.errors import ClockMovedBackwards, InvalidInput, LeaseLost, NoFreeNodeId
from engine.keys import Keys
from engine.pipeline.orders import Order

log = logging.getLogger("seckill.ids")

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODES = 1 << NODE_BITS
MAX_SEQ = (1 << SEQ_BITS) - 1
TIME_SHIFT = NODE_BITS + SEQ_BITS
MAX_MS = (1 << 41) - 1


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def compose(ms_since_epoch: int, node: int, seq: int) -> int:
    return (ms_since_epoch << TIME_SHIFT) | (node << SEQ_BITS) | seq


def decompose(instance_id: int) -> tuple[int, int, int]:
    """(unix ms, node, sequence) of an ID."""
    return ((instance_id >> TIME_SHIFT) + EPOCH_MS, (instance_id >> SEQ_BITS) & (MAX_NODES - 1),
            instance_id & MAX_SEQ)


class Snowflake:
    """An ID generator for one node; not thread-safe (one per event loop)."""

    def __init__(self, node_id: int, *, max_rollback_ms: int = 2000,
                 clock: Callable[[], int] = wall_ms,
                 sleep: Callable[[float], None] = time.sleep,
                 lease: NodeLease | None = None) -> None:
        if isinstance(node_id, bool) or not isinstance(node_id, int) or \
                not 0 <= node_id < MAX_NODES:
            raise InvalidInput(f"node_id: expected 0..{MAX_NODES - 1}, got {node_id!r}")
        self.node_id = node_id
        self.max_rollback_ms = max_rollback_ms
        self._clock = clock
        self._sleep = sleep
        self._lease = lease
        self._node_bits = node_id << SEQ_BITS
        self._last_ms = -1
        self._seq = 0

    def next_id(self) -> int:
        return self.take(1)[0]

    def take(self, n: int) -> list[int]:
        """`n` increasing IDs; the lease is checked for the batch and again after any wait."""
        if self._lease is not None:
            self._lease.check()
        out: list[int] = []
        while len(out) < n:
            ms = self._tick()
            # every sequence number left in this millisecond, at once
            first = self._seq
            count = min(n - len(out), MAX_SEQ + 1 - first)
            base = ((ms - EPOCH_MS) << TIME_SHIFT) | self._node_bits
            out.extend(range(base + first, base + first + count))
            self._seq = first + count
        return out

    def _tick(self) -> int:
        """The millisecond to issue in: now, or later if this one is used up or time went back."""
        ms = self._clock()
        if ms < self._last_ms:
            ms = self._wait_out_rollback(ms)
        if ms == self._last_ms and self._seq > MAX_SEQ:
            while ms <= self._last_ms:  # 4096 used in this ms: wait for the next one
                self._sleep(0.0001)
                ms = self._clock()
            self._lease_still_valid()
        if ms != self._last_ms:
            if ms - EPOCH_MS > MAX_MS:
                raise ClockMovedBackwards("clock beyond the 41-bit range of the epoch")
            self._last_ms = ms
            self._seq = 0
        return ms

    def _wait_out_rollback(self, ms: int) -> int:
        """Sleep until the clock is back at the last millisecond issued, within both bounds.

        The sleep blocks the event loop, renewal included, so it is only started when it
        can end before the lease's deadline: a wait the lease cannot outlive fails at once
        instead of blocking renewal for nothing. A stall longer than asked for is caught
        by checking the lease again afterwards, before any ID is issued.
        """
        while ms < self._last_ms:
            behind = self._last_ms - ms
            if behind > self.max_rollback_ms:
                raise ClockMovedBackwards(
                    f"clock moved back {behind} ms (bound {self.max_rollback_ms} ms); "
                    "refusing to issue IDs that could repeat")
            if self._lease is not None and behind / 1000 >= self._lease.remaining():
                raise LeaseLost(f"node {self.node_id}: clock moved back {behind} ms, longer "
                                "than the lease stays valid; stopping instead of waiting")
            self._sleep(behind / 1000)
            ms = self._clock()
        self._lease_still_valid()
        return ms

    def _lease_still_valid(self) -> None:
        if self._lease is not None:
            self._lease.check()


# compare-and-PEXPIRE / compare-and-DEL: only the owner may touch its lease
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not holder then
  return -1
end
return 0
"""
# why renewing failed, by RENEW's answer: a lease that is gone is not one somebody took
LOST_WHY = {-1: "lease key gone (expired, or Redis lost its state)",
            0: "lease taken by someone else"}
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# try node IDs from a random start; first free one wins, in one round trip. KEYS[1] is
# lease 0: every lease key shares its hash tag, so on a Redis Cluster the script runs on
# the node serving that one slot and every key it builds (ARGV[5] .. node) is local.
ACQUIRE = """
local n = tonumber(ARGV[3])
local start = tonumber(ARGV[4])
for i = 0, n - 1 do
  local node = (start + i) % n
  if redis.call('SET', ARGV[5] .. node, ARGV[1], 'NX', 'PX', ARGV[2]) then
    return node
  end
end
return -1
"""


class NodeLease:
    """A node ID owned in Redis for `ttl_ms`, renewed while the worker lives."""

    def __init__(self, redis: Redis, keys: Keys, *, owner: str, ttl_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.margin = min(ttl_ms / 10, 500) / 1000
        self.node_id = -1
        self._clock = clock
        self._valid_until = 0.0
        self._lost = False
        self.lost_why = "lease released"

    @property
    def key(self) -> str:
        return self.keys.node(self.node_id)

    @property
    def valid(self) -> bool:
        return not self._lost and self.node_id >= 0 and self._clock() < self._valid_until

    async def acquire(self) -> int:
        sent = self._clock()
        # The script builds the 1,024 key names it may try from ARGV[5]; the one key it
        # declares routes it to their common slot on a cluster.
        node = await self.redis.eval(ACQUIRE, 1, self.keys.node(0), self.owner, self.ttl_ms,
                                     MAX_NODES, random.randrange(MAX_NODES),
                                     self.keys.node(0)[:-1])
        node = int(node)
        if node < 0:
            raise NoFreeNodeId(f"all {MAX_NODES} snowflake node IDs are leased by live "
                               "workers; stop some or wait for dead ones' leases to expire")
        self.node_id, self._lost = node, False
        self._valid_until = sent + self.ttl_ms / 1000 - self.margin
        return node

    async def renew(self) -> bool:
        sent = self._clock()
        ok = int(await self.redis.eval(RENEW, 1, self.key, self.owner, self.ttl_ms))
        if ok != 1:
            self._lost = True
            self.lost_why = LOST_WHY.get(ok, LOST_WHY[0])
            return False
        self._valid_until = sent + self.ttl_ms / 1000 - self.margin
        return True

    async def release(self) -> None:
        if self.node_id >= 0 and not self._lost:
            await self.redis.eval(RELEASE, 1, self.key, self.owner)
        self._lost = True

    def remaining(self) -> float:
        """Seconds left to issue IDs on this lease without a renewal; 0 once lost or expired."""
        if self._lost or self.node_id < 0:
            return 0.0
        return max(0.0, self._valid_until - self._clock())

    def check(self) -> None:
        if self._lost:
            raise LeaseLost(f"node {self.node_id}: {self.lost_why}")
        if self._clock() >= self._valid_until:
            raise LeaseLost(f"node {self.node_id}: lease not renewed in time")

    async def keep_alive(self, interval: float | None = None) -> None:
        """Renew until cancelled; raise LeaseLost when Redis says it is no longer ours."""
        interval = interval or self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.renew():
                    raise LeaseLost(f"node {self.node_id}: {self.lost_why}")
            except (RedisError, RedisClusterException) as exc:
                # check() starts failing by itself once the lease could have expired
                log.warning("renewing node %d failed: %s", self.node_id, exc)


def assign_ids(orders: list[Order], snowflake: Snowflake) -> None:
    """The IDs stage of a batch: one fresh instance ID per order (the log may replace
    it by the ID an earlier delivery of the same order was given)."""
    for order, instance_id in zip(orders, snowflake.take(len(orders)), strict=True):
        order.instance_id = instance_id
