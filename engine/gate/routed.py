"""Script calls routed to their Redis masters, each master's down one connection.

Used for the coalesced purchases whenever a single pipelined connection cannot serve
them: on a Redis Cluster (each call must reach the master owning its keys' slot), and
with `gate_wait_replicas` (WAIT must follow the purchases on their own connection).

On a replicated Redis, a purchase the master took but had not yet sent to a replica
is lost when that master dies and the replica is promoted: a 202 for it would be a
lie. With `gate_wait_replicas` the gate sends `WAIT replicas timeout_ms` after the
purchase scripts that accepted someone, and a purchase whose master got fewer acks in
time is answered "unreplicated" (the BFF's 503), not "accepted".

WAIT counts the acknowledged writes *of the connection that sends it*, so it must go
down the very connection the purchases went down, after them. The redis-py pipelines
do not promise that (a cluster pipeline re-sends a redirected command alone, on
another connection), so this module holds one connection per master for a batch: the
EVALSHAs of the calls routed to that master, then, only if one of them wrote an
accepted order, one WAIT. Rejected attempts are answered without waiting. MOVED, ASK,
TRYAGAIN and CLUSTERDOWN replies (a reshard or failover) send those calls again, routed
anew (at most ROUNDS times).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from engine import backoff
from engine.config import Settings
from engine.connections import REDIS_ERRORS, is_cluster
from engine.errors import ServiceUnavailable, one_line

ROUNDS = 5  # sends of one call before a redirect loop is an outage
BACKOFF_MAX = 0.5  # seconds between two rounds at most
UNREPLICATED_MESSAGE = (
    "your order is recorded but not yet copied to a Redis replica, so a failover now could "
    "lose it; do not buy again: look up your order (GET /api/v1/seckill/{product}/order) "
    "in a few seconds")


@dataclass(frozen=True, slots=True)
class WaitFor:
    """Acks required of the replicas after an accepted purchase, and how long to wait."""

    replicas: int
    timeout_ms: int

    @classmethod
    def of(cls, settings: Settings) -> WaitFor | None:
        """From `gate_wait_replicas` / `gate_wait_ms`; None when WAIT is off."""
        if settings.gate_wait_replicas <= 0:
            return None
        return cls(settings.gate_wait_replicas, settings.gate_wait_ms)


@dataclass(slots=True)
class _Call:
    keys: list[str]
    args: list[str | int]
    future: asyncio.Future
    ask: str | None = None  # an ASK redirect: the node name to send it to, after ASKING
    error: BaseException | None = field(default=None)


# what a call's reply says about where it must go next (it did not run)
_REDIRECTS = (MovedError, AskError, TryAgainError, NoScriptError, ClusterDownError)


class RoutedScript:
    """A script whose calls of one loop turn go to their masters, each master's down one
    connection, followed there by WAIT when one of them wrote an order.

    A call resolves to `(reply, acked)`: the script's reply, and the replicas that
    acknowledged it (None when no WAIT was sent: WAIT off, or it wrote no order).
    Without WAIT it still serves the coalesced purchases on a cluster (a single Redis's
    go through ScriptPipe, engine/gate/pipe.py): packed and read here, they skip the
    redis-py cluster pipeline's per-command bookkeeping, most of what a purchase cost
    the gate there.
    """

    def __init__(self, redis: Redis, source: str, wait: WaitFor | None,
                 wrote: Callable[[object], bool]) -> None:
        """`wrote(reply)`: whether a reply is an accepted purchase (worth a WAIT);
        `wait` None: no WAIT, the calls only routed per master (acked always None)."""
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.wait = wait
        self.wrote = wrote
        self._queue: list[_Call] = []
        self._flushing: set[asyncio.Task] = set()
        self._reloading = asyncio.Lock()

    def __call__(self, keys: list[str], args: list[str | int]
                 ) -> asyncio.Future[tuple[object, int | None]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[object, int | None]] = loop.create_future()
        self._queue.append(_Call(keys, args, future))
        if len(self._queue) == 1:  # the first of this turn: send after the others queued
            loop.call_soon(self._flush_queue)
        return future

    def _flush_queue(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, calls: list[_Call]) -> None:
        """Every call to its master, again while redirected, at most ROUNDS times."""
        for attempt in range(1, ROUNDS + 1):
            again: list[_Call] = []
            try:
                groups = await self._route(calls)
            except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
                _fail(calls, exc)
                return
            sent = await self._on_connections(groups)
            for (node, group), outcome in zip(groups.values(), sent, strict=True):
                if isinstance(outcome, BaseException):  # the connection failed: ran or not
                    _fail(group, outcome)
                    await self._forget_layout()
                    continue
                again += await self._settle(node, group, *outcome)
            if not again:
                return
            calls = again
            if any(not isinstance(call.error, NoScriptError) for call in again):
                await asyncio.sleep(backoff.delay(attempt, BACKOFF_MAX))  # (a reload: at once)
        _fail(calls, None)

    async def _on_connections(self, groups: dict[str, tuple[Any, list[_Call]]]
                              ) -> list[Any]:
        """Each group down its connection: (replies, acked) or the exception, per group
        (one group, the single Redis's: without a gather and its task)."""
        if len(groups) == 1:
            ((node, group),) = groups.values()
            try:
                return [await self._on_one_connection(node, group)]
            except Exception as exc:  # noqa: BLE001 - as gather's return_exceptions
                return [exc]
        return await asyncio.gather(*(self._on_one_connection(node, group)
                                      for node, group in groups.values()),
                                    return_exceptions=True)

    async def _route(self, calls: list[_Call]) -> dict[str, tuple[Any, list[_Call]]]:
        """The calls grouped by the master that owns their keys' slot (one group on a
        single Redis)."""
        if not is_cluster(self.redis):
            return {"": (None, calls)}
        cluster = cast(RedisCluster, self.redis)
        await cluster.initialize()  # after a failure: the slot map anew
        groups: dict[str, tuple[Any, list[_Call]]] = {}
        for call in calls:
            node = cluster.get_node(node_name=call.ask) if call.ask else None
            if node is None:
                node = cluster.get_node_from_key(call.keys[0])
            if node is None:
                raise SlotNotCoveredError(f"no master for {call.keys[0]}")
            groups.setdefault(node.name, (node, []))[1].append(call)
        return groups

    async def _on_one_connection(self, node: ClusterNode | None, calls: list[_Call]
                                 ) -> tuple[list[object], int | None]:
        """Send the calls down one connection, then WAIT on it if one wrote an order."""
        conn, release = await self._acquire(node)
        try:
            commands: list[tuple[Any, ...]] = []
            for call in calls:
                if call.ask:
                    commands.append(("ASKING",))
                commands.append(("EVALSHA", self.sha, len(call.keys), *call.keys, *call.args))
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[object] = []
            for command in commands:
                reply = await _read(conn)
                if command[0] != "ASKING":
                    replies.append(reply)
            acked = None
            if self.wait is not None and any(self.wrote(reply) for reply in replies):
                await conn.send_command("WAIT", self.wait.replicas, self.wait.timeout_ms)
                acked = int(cast(int, await conn.read_response()))
        except BaseException:
            await conn.disconnect()  # half-read replies must not reach the next user
            raise
        finally:
            await release(conn)
        return replies, acked

    async def _acquire(self, node: ClusterNode | None) -> tuple[Any, Callable[[Any], Any]]:
        if node is None:
            pool = self.redis.connection_pool
            return await pool.get_connection(), pool.release

        async def release(conn: Any) -> None:
            node.release(conn)

        conn = node.acquire_connection()
        await node.disconnect_if_needed(conn)
        return conn, release

    async def _settle(self, node: ClusterNode | None, calls: list[_Call], replies: list[object],
                      acked: int | None) -> list[_Call]:
        """Resolve the calls that ran; return those a redirect sends again."""
        again = []
        for call, reply in zip(calls, replies, strict=True):
            call.ask = None
            if isinstance(reply, _REDIRECTS):
                call.error = reply
                await self._redirected(node, call, reply)
                again.append(call)
            elif isinstance(reply, Exception):
                _fail([call], reply)
            elif not call.future.done():
                call.future.set_result((reply, acked if self.wrote(reply) else None))
        return again

    async def _redirected(self, node: ClusterNode | None, call: _Call,
                          reply: BaseException) -> None:
        if isinstance(reply, NoScriptError):  # SCRIPT FLUSH, or a fresh replica promoted
            await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "SCRIPT LOAD", self.source, **({} if node is None else {"target_nodes": node}))
        elif isinstance(reply, MovedError):  # (a MovedError is an AskError too)
            await cast(RedisCluster, self.redis).nodes_manager.move_slot(reply)
        elif isinstance(reply, AskError):
            call.ask = f"{reply.host}:{reply.port}"
        elif isinstance(reply, ClusterDownError):  # a failover under way: the map anew
            await self._forget_layout()

    async def _forget_layout(self) -> None:
        """After a failed connection, the slot map again (a failover may have moved the
        slots), once for all the batches that failed together; the connections other
        batches are using stay open (RedisCluster.aclose would cut them too)."""
        if not is_cluster(self.redis):
            return
        if self._reloading.locked():  # another batch is reloading it: use that one
            async with self._reloading:
                return
        async with self._reloading:
            with contextlib.suppress(*REDIS_ERRORS):  # still down: the next call says so
                await cast(RedisCluster, self.redis).nodes_manager.initialize()


async def _read(conn: Any) -> object:
    """One reply; an error reply is returned (as the exception), not raised."""
    try:
        return cast(object, await conn.read_response())
    except ResponseError as exc:
        return exc


def _fail(calls: list[_Call], exc: BaseException | None) -> None:
    """The calls' futures failed with `exc`; None: they were redirected ROUNDS times (a
    slot still migrating, a failover not settled), an outage for the caller."""
    for call in calls:
        if not call.future.done():
            error = exc or ServiceUnavailable(
                f"Redis: still redirected after {ROUNDS} tries ({one_line(call.error, typed=True)})"
                if call.error else "Redis: no answer")
            call.future.set_exception(error)
