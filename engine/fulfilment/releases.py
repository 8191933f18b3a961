"""Release requests into INSTANCE_RELEASED events: the engine's half of giving one back.

An owner's `DELETE .../order` (or `seckill order release`) appends a request to
the product's `stream:seckill:{<pid>}:releases` with fields `uid`, `instance_id`,
`stream_id` (the order's own entry), `sale` and `at` (unix ms). Every worker reads
those streams in the consumer group the order streams use (`product-service`, its
consumer `<engine_id>-<slot>`), and for each request:

1. moves the order's row RUNNING -> RELEASING in `seckill_logs`, only where the
   row's product, user, instance and stream entry are the request's;
2. publishes INSTANCE_RELEASED (routing key `instance.released`; persistent,
   mandatory, confirmed, user-id the engine's broker user) for a RELEASING row;
3. acknowledges the request only then.

At least once: a request read again (a worker died between 1 and 3) finds its row
RELEASING and publishes again (the Resource Domain deletes once and reports
RELEASED again); a row already RELEASED is acknowledged without publishing. A
request with a missing or malformed field, for an unknown instance, for an order
that is not the requester's, or for one that is not running goes to
`stream:seckill:{<pid>}:releases:dlq` with its reason, and never holds up the others.

Requests are rare next to orders, and an engine may have a thousand sales open: a
worker does not read every release stream to find none. The gate adds, after each
request it records, the product's ID to one stream of signals,
`stream:seckill:release-signals` (not in the request's script: on a Redis Cluster it
is in another slot). Every `release_poll_interval` a worker reads the signals that came
since it last looked (one XREAD of one key, empty when nobody released) and reads the
release streams of the products they name, and of those whose last read returned
requests (there may be more), with one non-blocking XREADGROUP (on a Redis Cluster, one
per slot, sent straight to the slot's master, all in one pipeline). Every
`janitor_interval` it sweeps every stream instead (a signal can be lost: the gate's
process died between the request and its signal, or the worker fell more than the
signals kept behind) and claims the requests pending on a consumer idle for
`claim_idle_ms` (a worker of a host that is gone). A worker re-reads its own pending
requests first (after a restart, or a batch that failed): a start and a failure begin
with a sweep.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from engine import backoff
from engine.amqp.publisher import CONFIRMED, ConfirmPublisher, Message
from engine.amqp.topology import RK_RELEASED
from engine.config import Settings
from engine.connections import PG_ERRORS, RETRYABLE, is_cluster
from engine.errors import DatabaseFailed, PublishFailed, one_line
from engine.keys import GROUP, Keys
from engine.orderstates import RELEASED, RELEASING
from engine.pb import event_pb2
from engine.pipeline.reader import ensure_group, is_nogroup

log = logging.getLogger("seckill.releases")

TYPE_NAME = "INSTANCE_RELEASED"
NEW, OWN = b">", b"0"
COUNT = 100  # requests read per stream at once
SIGNALS_READ = 1000  # release signals read at once
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")

TO_RELEASING = """
UPDATE seckill_logs AS l SET status = 'RELEASING', updated_at = now()
FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS r(instance_id, user_id, stream_id)
WHERE l.product_id = $1 AND l.instance_id = r.instance_id AND l.user_id = r.user_id
  AND l.stream_id = r.stream_id AND l.status = 'RUNNING'
"""
# with the product, so that the event names the objects the instance was made of
ROWS = """
SELECT l.instance_id, l.user_id, l.stream_id, l.status, l.sale_id, l.slot,
       p.name, p.cpus, p.memory_mb, p.gpu, p.image
FROM seckill_logs l LEFT JOIN products p ON p.id = l.product_id
WHERE l.product_id = $1 AND l.instance_id = ANY($2::bigint[])
"""


@dataclass(frozen=True, slots=True)
class Request:
    entry_id: bytes
    user_id: int
    instance_id: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class Refusal:
    entry_id: bytes
    fields: dict[bytes, bytes]
    reason: str
    detail: str


def parse(entry_id: bytes, fields: dict[bytes, bytes]) -> Request | Refusal:
    """A request, or why it is not one."""
    missing = [k for k in ("uid", "instance_id", "stream_id") if k.encode() not in fields]
    if missing:
        return Refusal(entry_id, fields, "bad_request", f"missing {', '.join(missing)}")
    uid, iid = fields[b"uid"].decode(errors="replace"), fields[b"instance_id"].decode(
        errors="replace")
    order = fields[b"stream_id"].decode(errors="replace")
    for name, value in (("uid", uid), ("instance_id", iid)):
        if not (value.isascii() and value.isdigit() and 0 < int(value) < 2**63):
            return Refusal(entry_id, fields, "bad_request",
                           f"{name}: expected a positive int64, got {value[:40]!r}")
    if not STREAM_ID.fullmatch(order):
        return Refusal(entry_id, fields, "bad_request",
                       f"stream_id: expected a stream entry ID, got {order[:40]!r}")
    return Request(entry_id, int(uid), int(iid), order)


def judge(request: Request, row: asyncpg.Record | None) -> str | Refusal:
    """What to do with a request once its row is moved: 'publish', 'ack', or refuse."""
    def refuse(reason: str, detail: str) -> Refusal:
        return Refusal(request.entry_id, {}, reason, detail)
    if row is None:
        return refuse("unknown_instance", f"no order of this product has instance ID "
                      f"{request.instance_id}")
    if (row["user_id"], row["stream_id"]) != (request.user_id, request.stream_id):
        return refuse("not_owner", f"instance {request.instance_id} is the order "
                      f"{row['stream_id']} of user {row['user_id']}, not {request.stream_id} "
                      f"of user {request.user_id}")
    if row["status"] == RELEASING:
        return "publish"
    if row["status"] == RELEASED:
        return "ack"
    return refuse("not_running", f"instance {request.instance_id} is {row['status']}; only "
                  "a RUNNING instance is released")


class ReleaseRequests:
    """Reads every product's release-request stream for one worker's consumer."""

    def __init__(self, settings: Settings, redis: Redis, pool: asyncpg.Pool, keys: Keys,
                 consumer: str) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.consumer = consumer
        self.publisher = ConfirmPublisher(settings, RK_RELEASED, TYPE_NAME)
        self.cursors: dict[int, bytes] = {}  # product ID -> OWN (re-read) or NEW
        self._cluster = is_cluster(redis)
        self._slots: dict[int, int] = {}  # product ID -> its release stream's slot
        self._members: set[bytes | str] = set()  # of the set of streams, those discovered
        self._next_discovery = 0.0
        self._next_claim = 0.0
        self._next_sweep = 0.0
        self._signal: bytes | None = None  # the last signal entry seen (None: not yet)
        self._again: set[int] = set()  # products read at the next pass, signal or not

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: read, settle, and wait a little whenever nothing came."""
        failures = 0
        try:
            while not stopping.is_set():
                try:
                    busy = await self.pass_once()
                    failures = 0
                except RETRYABLE as exc:
                    failures += 1
                    self.cursors = dict.fromkeys(self.cursors, OWN)  # re-read what we hold
                    self._next_sweep = 0.0
                    delay = backoff.delay(failures, self.settings.retry_backoff_max)
                    log.warning("release requests: %s; retrying in %.1fs", exc, delay,
                                extra={"event": "release_retry"})
                    busy = False
                if not busy:
                    await _pause(stopping, self.settings.release_poll_interval)
        finally:
            await self.publisher.close()

    async def pass_once(self) -> bool:
        """Discover, claim abandoned requests, read and settle; True if any was read."""
        now = time.monotonic()
        if now >= self._next_discovery:
            await self.discover()
            self._next_discovery = now + self.settings.discovery_interval
        busy = False
        if now >= self._next_claim:
            self._next_claim = now + self.settings.janitor_interval
            for pid, items in await self._claim_abandoned():
                busy |= await self.settle(pid, items)
        due = await self._due(now)
        if due is None or due:
            for pid, items in await self.read(due):
                busy |= await self.settle(pid, items)
        return busy

    async def _due(self, now: float) -> list[int] | None:
        """The products whose stream this pass reads; None for every one (a sweep)."""
        signalled = await self.signalled()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.janitor_interval
            return None
        due = self._again | signalled
        return [pid for pid in due if pid in self.cursors]

    async def signalled(self) -> set[int]:
        """The products named by the signals the gate added since the last look. The
        first look only marks where the signals end: a sweep follows it."""
        key = self.keys.release_signals
        if self._signal is None:
            last: Any = await self.redis.xrevrange(key, count=1)
            self._signal = last[0][0] if last else b"0-0"
            return set()
        reply: Any = await self.redis.xread({key: self._signal}, count=SIGNALS_READ)
        entries = [e for _, items in _stream_pairs(reply) for e in items]
        if not entries:
            return set()
        self._signal = entries[-1][0]
        if len(entries) == SIGNALS_READ:
            self._next_sweep = 0.0  # far behind: read every stream now
        return {int(f[b"pid"]) for _, f in entries
                if f and f.get(b"pid", b"").isdigit()}

    async def discover(self) -> None:
        """The release streams of every product the engine reads orders of."""
        members = await self.redis.smembers(self.keys.streams)
        for raw in members - self._members:  # type: ignore[operator]
            pid = int(raw)
            if pid not in self.cursors:
                await ensure_group(self.redis, self.keys.releases(pid))
                self._reread(pid)
            self._members.add(raw)

    def _reread(self, pid: int) -> None:
        """Read `pid`'s stream from our own pending requests on, at the next pass."""
        self.cursors[pid] = OWN
        self._again.add(pid)

    async def read(self, pids: list[int] | None = None) -> list[tuple[int, list]]:
        """The requests of `pids`' streams (of every stream by default): our own pending
        ones first, then new ones. One XREADGROUP names every stream of a slot: a single
        Redis reads them all at once, a cluster once per slot, the slots' reads in one
        pipeline (one round trip per node)."""
        groups = self._by_slot(list(self.cursors) if pids is None else pids)
        got: dict[int, list] = {}
        if groups:
            pipe = self.redis.pipeline(transaction=False)
            for group in groups:
                streams = [self.keys.releases(pid) for pid in group]
                pipe.execute_command(
                    "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", COUNT, "STREAMS",
                    *streams, *(self.cursors[pid] for pid in group), **self._route(streams[0]))
            replies = await pipe.execute(raise_on_error=False)
            for group, reply in zip(groups, replies, strict=True):
                got.update(await self._requests(group, reply))
        out = []
        again: set[int] = set()
        for pid in [pid for group in groups for pid in group]:
            if items := got.get(pid):
                out.append((pid, items))
                again.add(pid)  # COUNT of them: maybe more
            elif self.cursors.get(pid) == OWN:
                self.cursors[pid] = NEW  # nothing of ours left: new requests next
                again.add(pid)
        self._again = again
        return out

    def _by_slot(self, pids: list[int]) -> list[list[int]]:
        if not self._cluster:
            return [pids] if pids else []
        slots: dict[int, list[int]] = {}
        for pid in pids:
            slot = self._slots.get(pid)
            if slot is None:
                slot = self._slots[pid] = key_slot(self.keys.releases(pid).encode())
            slots.setdefault(slot, []).append(pid)
        return list(slots.values())

    async def _requests(self, pids: list[int], reply: Any) -> dict[int, list]:
        """Each stream's requests in the XREADGROUP `reply` for the streams of `pids`."""
        if isinstance(reply, ResponseError) and is_nogroup(reply):
            for pid in pids:
                await ensure_group(self.redis, self.keys.releases(pid))  # Redis lost it
                self.cursors[pid] = OWN
            return {}
        if isinstance(reply, BaseException):
            raise reply
        pid_of = {self.keys.releases(pid): pid for pid in pids}
        return {pid_of[_text(stream)]: items for stream, items in _stream_pairs(reply)}

    async def _claim_abandoned(self) -> list[tuple[int, list]]:
        """Requests pending on a consumer idle for claim_idle_ms (its worker is gone), of
        every stream, in one pipeline (split per node on a cluster)."""
        pids = list(self.cursors)
        if not pids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for pid in pids:
            pipe.xautoclaim(self.keys.releases(pid), GROUP, self.consumer,
                            self.settings.claim_idle_ms, count=COUNT)
        replies = await pipe.execute(raise_on_error=False)
        out = []
        for pid, reply in zip(pids, replies, strict=True):
            if isinstance(reply, ResponseError) and is_nogroup(reply):
                await ensure_group(self.redis, self.keys.releases(pid))  # Redis lost it
                self._reread(pid)
            elif isinstance(reply, BaseException):
                raise reply
            elif items := [i for i in reply[1] if i[1] is not None]:
                out.append((pid, items))
        return out

    def _route(self, stream: str) -> dict[str, Any]:
        """Straight to the slot's master on a cluster (no COMMAND GETKEYS round trip)."""
        if not self._cluster:
            return {}
        try:
            node = self.redis.nodes_manager.get_node_from_slot(  # type: ignore[attr-defined]
                key_slot(stream.encode()))
        except Exception:  # noqa: BLE001 - a table being reloaded: let the client route
            return {}
        return {"target_nodes": node}

    async def settle(self, pid: int, items: list) -> bool:
        """Move, publish, acknowledge one stream's requests; refuse the bad ones."""
        if not items:
            return False
        parsed = [parse(entry_id, fields or {}) for entry_id, fields in items]
        refused = [p for p in parsed if isinstance(p, Refusal)]
        requests = [p for p in parsed if isinstance(p, Request)]
        rows = await self._move(pid, requests) if requests else {}
        to_publish: dict[int, list[Request]] = {}
        done: list[bytes] = []
        for request in requests:
            verdict = judge(request, rows.get(request.instance_id))
            if isinstance(verdict, Refusal):
                refused.append(Refusal(request.entry_id, _fields(items, request.entry_id),
                                       verdict.reason, verdict.detail))
            elif verdict == "ack":
                done.append(request.entry_id)
            else:
                to_publish.setdefault(request.instance_id, []).append(request)
        confirmed, unconfirmed = await self._publish(pid, rows, to_publish)
        await self._dead_letter(pid, refused)
        if done + confirmed:
            await self.redis.xack(self.keys.releases(pid), GROUP, *done, *confirmed)
        if unconfirmed:  # left pending on us: read again after a backoff
            raise PublishFailed(f"{unconfirmed} release events not confirmed")
        return True

    async def _move(self, pid: int, requests: list[Request]) -> dict[int, asyncpg.Record]:
        """RUNNING -> RELEASING where the request is the owner's; every named row after."""
        timeout = self.settings.db_timeout
        try:
            async with self.pool.acquire(timeout=timeout) as conn:
                await conn.execute(TO_RELEASING, pid, [r.instance_id for r in requests],
                                   [r.user_id for r in requests],
                                   [r.stream_id for r in requests], timeout=timeout)
                found = await conn.fetch(ROWS, pid, [r.instance_id for r in requests],
                                         timeout=timeout)
        except PG_ERRORS as exc:  # a stuck or failing database: retried, not a crash
            raise DatabaseFailed(f"release requests: {one_line(exc)}") from exc
        return {row["instance_id"]: row for row in found}

    async def _publish(self, pid: int, rows: dict[int, asyncpg.Record],
                       requests: dict[int, list[Request]]) -> tuple[list[bytes], int]:
        """One INSTANCE_RELEASED per instance; (the entry IDs whose event was confirmed,
        how many instances' events were not)."""
        if not requests:
            return [], 0
        ids = list(requests)
        messages = [Message(released_event(pid, rows[i]).SerializeToString(), str(i))
                    for i in ids]
        results = await self.publisher.publish(messages, self.settings.publish_timeout)
        confirmed = [r.entry_id for i, res in zip(ids, results, strict=True)
                     if res == CONFIRMED for r in requests[i]]
        for i, res in zip(ids, results, strict=True):
            if res == CONFIRMED:
                log.info("release of instance %d asked", i, extra={
                    "event": "release_published", "instance_id": i, "product_id": pid})
        return confirmed, sum(res != CONFIRMED for res in results)

    async def _dead_letter(self, pid: int, refused: list[Refusal]) -> None:
        if not refused:
            return
        pipe = self.redis.pipeline(transaction=True)  # one slot: the {pid} tag
        for r in refused:
            entry: dict[Any, Any] = dict(r.fields)
            entry.update({"reason": r.reason, "detail": r.detail, "entry": r.entry_id,
                          "at": str(int(time.time() * 1000))})
            pipe.xadd(self.keys.release_dlq(pid), entry)
            pipe.xack(self.keys.releases(pid), GROUP, r.entry_id)
            log.warning("release request dead-lettered: %s", r.detail,
                        extra={"event": "release_dead_letter", "reason": r.reason})
        await pipe.execute()


def released_event(pid: int, row: asyncpg.Record) -> event_pb2.Event:
    """INSTANCE_RELEASED for an order's row, as the Resource Domain reads it: the
    order's fields of INSTANCE_CREATED (name and spec from the catalog, when the product
    is still there), so it can delete exactly the objects it made."""
    spec = (event_pb2.InstanceSpec(cpus=row["cpus"], memory_mb=row["memory_mb"],
                                   gpu=row["gpu"], image=row["image"])
            if row["cpus"] is not None else None)
    return event_pb2.Event(
        event_type=event_pb2.INSTANCE_RELEASED, instance_id=row["instance_id"],
        user_id=row["user_id"], name=row["name"] or "", spec=spec,
        timestamp=int(time.time()), product_id=pid, stream_id=row["stream_id"],
        sale_id=row["sale_id"] or "", slot=row["slot"] or 0)


def _stream_pairs(reply: Any) -> list[tuple[Any, list]]:
    """(stream, entries) of an XREAD or XREADGROUP reply, RESP2 (a list of pairs) or
    RESP3 (a map of each stream to a list holding its entries)."""
    if isinstance(reply, dict):
        return [(stream, list(items[0])) for stream, items in reply.items()]
    return [(stream, list(items)) for stream, items in reply or []]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(items: list, entry_id: bytes) -> dict[bytes, bytes]:
    return next((dict(f or {}) for i, f in items if i == entry_id), {})


async def _pause(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass
