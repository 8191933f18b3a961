"""Helpers for tests that run the real engine against the real services."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
from redis.asyncio import Redis

from engine.config import Settings, to_env
from engine.keys import EXCHANGE, GROUP, RK_CREATED, Keys
from engine.pb import event_pb2
from engine.products import gpu_product, upsert_products

SECKILL = str(Path(sys.executable).with_name("seckill"))


def engine_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """Environment that points a `seckill` subprocess at the test's services and prefix."""
    quick = {"metrics_port": 0, "log_json": False, "janitor_interval": 1.0,
             "graceful_timeout": 15, "heartbeat_timeout": 10, "boot_timeout": 10,
             "discovery_interval": 0.2}
    return to_env(settings, **{**quick, **overrides})


def free_port() -> int:
    """A TCP port nobody listens on right now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def purge_queues(amqp_url: str, *queues: str) -> None:
    """Empty queues of the session's vhost: what other tests' processes left there
    is not the next test's to consume."""
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel()
        for queue in queues:
            await channel.queue_purge(queue)
    finally:
        await conn.close()


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class EngineProcess:
    """`seckill run` as a child process, its output in a file for post-mortems."""

    def __init__(self, settings: Settings, workers: int = 2, **overrides: Any) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="seckill-engine-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([SECKILL, "run", "--workers", str(workers)],
                                     env=engine_env(settings, **overrides),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def booted(self, workers: int) -> bool:
        """True once `workers` workers run and each has logged that it booted."""
        return (len(self.children()) == workers
                and self.output().count(" booted as ") >= workers)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                   interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def table_locked(dsn: str, table: str, mode: str = "EXCLUSIVE") -> AsyncIterator[None]:
    """Hold a PostgreSQL table lock, so whoever needs the table waits (a stuck database)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN {mode} MODE")
            yield
    finally:
        await conn.close()


async def push_orders(redis: Redis, keys: Keys, pid: int, users: range | list[int],
                      sale: str | None = "sale-1", first_slot: int = 1) -> list[str]:
    """XADD orders as the gate would write them (uid, ts, sale, slot), pipelined."""
    ids: list[str] = []
    now = str(int(time.time()))
    users = list(users)
    for start in range(0, len(users), 5000):
        pipe = redis.pipeline(transaction=False)
        for i, uid in enumerate(users[start:start + 5000], start):
            fields = {"uid": str(uid), "ts": now}
            if sale is not None:
                fields.update(sale=sale, slot=str(first_slot + i))
            pipe.xadd(keys.stream(pid), fields)
        ids += [x.decode() if isinstance(x, bytes) else x for x in await pipe.execute()]
    return ids


async def announce(redis: Redis, keys: Keys, pid: int) -> None:
    """What `sale open` does for the engine: group from 0, stream registered."""
    try:
        await redis.xgroup_create(keys.stream(pid), GROUP, id="0", mkstream=True)
    except Exception as exc:  # noqa: BLE001
        if "BUSYGROUP" not in str(exc):
            raise
    await redis.sadd(keys.streams, pid)


async def open_sales(settings: Settings, redis: Any, keys: Keys, pids: list[int]) -> None:
    """The products in the catalog and their sales announced to the engine."""
    await add_products(settings, pids)
    for pid in pids:
        await announce(redis, keys, pid)


async def add_products(settings: Settings, pids: list[int]) -> None:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        await upsert_products(conn, [gpu_product(pid) for pid in pids])
    finally:
        await conn.close()


async def pg_fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """One query on a connection of its own (closed after it)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def log_rows(settings: Settings, pids: list[int]) -> list[asyncpg.Record]:
    return await pg_fetch(
        settings.pg_dsn, "SELECT product_id, user_id, instance_id, stream_id, sale_id, slot,"
        " status FROM seckill_logs WHERE product_id = ANY($1::bigint[])", pids)


async def pending_count(redis: Redis, keys: Keys, pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            info = await redis.xpending(keys.stream(pid), GROUP)
        except Exception:  # noqa: BLE001 - no group yet
            continue
        total += info["pending"]
    return total


class EventTap:
    """A durable private queue bound to instance.created, read after the run.

    Durable so it survives a broker restart in the middle of a test; it is
    deleted when the test is done.
    """

    def __init__(self, amqp_url: str, routing_key: str = RK_CREATED) -> None:
        self.url = amqp_url
        self.routing_key = routing_key
        self.queue = f"test-tap-{uuid.uuid4().hex[:8]}"
        self.events: list[tuple[Any, Any]] = []  # (properties, Event)

    async def __aenter__(self) -> EventTap:
        conn = await aiormq.connect(self.url)
        channel = await conn.channel()
        await channel.queue_declare(self.queue, durable=True)
        await channel.queue_bind(self.queue, EXCHANGE, routing_key=self.routing_key)
        await conn.close()
        return self

    async def collect(self, expected: int, timeout: float = 60) -> list[Any]:
        """Consume until `expected` events arrived (or the timeout); returns the events."""
        conn = await aiormq.connect(self.url)
        try:
            channel = await conn.channel()
            await channel.basic_qos(prefetch_count=1000)
            done = asyncio.Event()
            started = handled = 0

            async def on_message(message: Any) -> None:
                nonlocal started, handled
                started += 1
                event = event_pb2.Event()
                event.ParseFromString(message.body)
                self.events.append((message.header.properties, event))
                await channel.basic_ack(message.delivery.delivery_tag)
                handled += 1
                if len(self.events) >= expected:
                    done.set()

            async def drained() -> bool:
                # The broker's answer comes after every delivery it sent us before, and
                # each delivery's callback is started before we resume.
                ready = (await channel.queue_declare(self.queue, passive=True)).message_count
                return ready == 0 and handled == started

            if len(self.events) < expected:
                await channel.basic_consume(self.queue, on_message)
                try:
                    await asyncio.wait_for(done.wait(), timeout)
                except TimeoutError:
                    pass
            if done.is_set():
                # and whatever else is queued already (an order's event again)
                await wait_for(drained, 30, "the tap queue drained", interval=0.02)
        finally:
            await conn.close()
        return [e for _, e in self.events]

    async def __aexit__(self, *exc: object) -> None:
        conn = await aiormq.connect(self.url)
        channel = await conn.channel()
        await channel.queue_delete(self.queue)
        await conn.close()


async def row_count(settings, pids) -> int:
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM seckill_logs WHERE product_id = ANY($1::bigint[])", pids)
    finally:
        await conn.close()


async def all_done(settings, redis, keys, pids, total) -> bool:
    return (await row_count(settings, pids) == total
            and await pending_count(redis, keys, pids) == 0)


def assert_one_id_per_order(rows, events, orders: int) -> None:
    """One row per order, one distinct instance ID per order, every event carries it."""
    assert len(rows) == orders
    by_stream = {(r["product_id"], r["stream_id"]): r["instance_id"] for r in rows}
    assert len(by_stream) == orders
    assert len(set(by_stream.values())) == orders
    seen = set()
    for e in events:
        key = (e.product_id, e.stream_id)
        assert by_stream[key] == e.instance_id, "an event carried a second instance ID"
        seen.add(key)
    assert seen == set(by_stream), "some logged orders were never published"


async def rows_at_least(settings, pids, n) -> bool:
    return await row_count(settings, pids) >= n


async def workers_are(engine: EngineProcess, n: int) -> bool:
    return len(engine.children()) == n


async def collect_orders(tap: EventTap, orders: int, timeout: float = 60) -> list[Any]:
    """Consume the tap until events of `orders` distinct orders came (or the timeout).

    After an outage an order's event may come more than once (same instance ID); a count
    of events alone would stop early and leave some orders' first events unread.
    """
    deadline = time.monotonic() + timeout
    while True:
        distinct = len({(e.product_id, e.stream_id) for _, e in tap.events})
        left = deadline - time.monotonic()
        if distinct >= orders or left <= 0:
            return [e for _, e in tap.events]
        await tap.collect(len(tap.events) + orders - distinct, timeout=left)



def established_tcp() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, bytes sent and not yet acknowledged, bytes received and
    not yet read) of each ESTABLISHED TCP socket of this host, as the kernel lists them:
    what a test waits on to know that a server has read what a client sent, or that a
    reset has ended a connection."""
    found = []
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            _, local, remote, state, queues, *_ = line.split()
            if state == "01":  # TCP_ESTABLISHED
                unacked, unread = (int(n, 16) for n in queues.split(":"))
                found.append((int(local.rsplit(":", 1)[1], 16),
                               int(remote.rsplit(":", 1)[1], 16), unacked, unread))
    return found
