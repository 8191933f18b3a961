"""A worker process: its own loop, connections, node ID and consumer name.

Everything here is created after fork. The worker reads batches and hands
each to the pipeline as a task, holding at most `max_inflight_batches`, so
batch k+1 is being read while batch k is logged and published, and a slow
dependency throttles reading instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from . import metrics
from .catalog import Catalog
from .config import Settings
from .connections import TRANSIENT_ERRORS, connect_redis, create_pg_pool
from .errors import BootError, LeaseLost, SeckillError, ServiceUnavailable
from .events import INSTANCE_CREATED, TYPE_NAMES
from .ids import NodeLease, Snowflake
from .janitor import Janitor
from .keys import RK_CREATED, Keys
from .logsink import prepare_connection
from .orders import DeadLetter, Entry
from .pipeline import Pipeline
from .publisher import ConfirmPublisher
from .reader import StreamReader
from .settle import record_errors
from .status import StatusConsumer

log = logging.getLogger("seckill.worker")

# Exit codes the supervisor acts on.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT = 3
EXIT_LEASE_LOST = 4

T = TypeVar("T")
BOOT_ERRORS: tuple[type[BaseException], ...] = (SeckillError, *TRANSIENT_ERRORS)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (ServiceUnavailable, *TRANSIENT_ERRORS)


def consumer_name(slot: int) -> str:
    """Stable per slot, so a respawned worker finds its predecessor's pending entries."""
    return f"{socket.gethostname()}-{slot}"


class Worker:
    def __init__(self, settings: Settings, slot: int, heartbeat: Path | None = None) -> None:
        self.settings = settings
        self.slot = slot
        self.heartbeat = heartbeat
        self.keys = Keys(settings.key_prefix)
        self.consumer = consumer_name(slot)
        self.stopping = asyncio.Event()
        self.exit_code = EXIT_OK
        self._tasks: set[asyncio.Task] = set()
        self._inflight: asyncio.Semaphore | None = None
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    # -- boot ---------------------------------------------------------------
    async def boot(self) -> None:
        """Connect to everything, retrying until the boot timeout; BootError if not."""
        deadline = time.monotonic() + self.settings.boot_timeout
        s = self.settings
        self.redis = await _until(deadline, lambda: connect_redis(s))
        self._closers.append(self.redis.aclose)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = NodeLease(self.redis, self.keys, owner=owner, ttl_ms=s.node_lease_ttl_ms)
        await _until(deadline, self.lease.acquire)
        self._closers.insert(0, self.lease.release)
        metrics.LEASE_HELD.set(1)
        self.pool = await _until(deadline, lambda: create_pg_pool(
            s, size=s.max_inflight_batches + 2, init=prepare_connection))
        self._closers.append(self.pool.close)
        self.publisher = ConfirmPublisher(s, RK_CREATED, TYPE_NAMES[INSTANCE_CREATED])
        await _until(deadline, self.publisher.connect)
        self._closers.append(self.publisher.close)
        self.pipeline = Pipeline(
            settings=s, keys=self.keys, redis=self.redis, pool=self.pool,
            publisher=self.publisher, catalog=Catalog(self.pool, s.product_cache_ttl),
            snowflake=Snowflake(self.lease.node_id, max_rollback_ms=s.max_clock_rollback_ms,
                                lease=self.lease),
            consumer=self.consumer)
        self.reader = StreamReader(self.redis, self.keys, self.consumer, s.batch_size,
                                   s.block_ms, s.max_deliveries)
        self.janitor = Janitor(self.redis, self.keys, self.consumer, idle_ms=s.claim_idle_ms,
                               count=s.batch_size, max_deliveries=s.max_deliveries)
        self.status = StatusConsumer(s, self.redis, self.pool)
        self._inflight = asyncio.Semaphore(s.max_inflight_batches)
        log.info("worker %d booted as %s, node %d", self.slot, self.consumer,
                 self.lease.node_id, extra={"event": "worker_booted", "slot": self.slot,
                                            "node_id": self.lease.node_id})

    # -- run ------------------------------------------------------------------
    async def run(self) -> int:
        try:
            await self.boot()
        except BOOT_ERRORS as exc:
            log.error("worker %d failed to boot: %s", self.slot, exc,
                      extra={"event": "boot_failed", "slot": self.slot})
            await self._close()
            return EXIT_BOOT
        self._beat()
        background = [asyncio.create_task(c) for c in (
            self._heartbeat_loop(), self._lease_loop(), self._discovery_loop(),
            self._janitor_loop(), self.status.run(self.stopping))]
        try:
            await self._read_loop()
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._close()
        return self.exit_code

    def stop(self, code: int = EXIT_OK) -> None:
        if not self.stopping.is_set():
            self.exit_code = code
            self.stopping.set()

    async def _read_loop(self) -> None:
        assert self._inflight is not None
        await self._guard("discovery", self.reader.discover)
        failures = 0
        while not self.stopping.is_set():
            if not await self._acquire_slot():
                break
            try:
                entries, dead = await self.reader.read()
                failures = 0
            except TRANSIENT_ERRORS as exc:
                self._inflight.release()
                failures += 1
                await self._backoff("read", exc, failures)
                continue
            self._submit(entries, dead, acquired=True)

    async def _acquire_slot(self) -> bool:
        """Wait for room for one more batch; False if we are told to stop first."""
        assert self._inflight is not None
        acquire = asyncio.ensure_future(self._inflight.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait((acquire, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire.done():
            return True
        acquire.cancel()
        return False

    def _submit(self, entries: list[Entry], dead: Sequence[DeadLetter],
                *, acquired: bool) -> None:
        assert self._inflight is not None
        if not entries and not dead:
            if acquired:
                self._inflight.release()
            return
        task = asyncio.create_task(self._run_batch(entries, dead, acquired))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, entries: list[Entry], dead: Sequence[DeadLetter],
                         acquired: bool) -> None:
        assert self._inflight is not None
        if not acquired:
            await self._inflight.acquire()
        metrics.INFLIGHT.inc()
        try:
            await self.pipeline.process(entries, dead)
        except LeaseLost as exc:
            log.error("node lease lost; stopping: %s", exc, extra={"event": "lease_lost"})
            metrics.LEASE_LOST.inc()
            self.stop(EXIT_LEASE_LOST)
        except Exception as exc:
            # A bug, not bad data (that is dead-lettered) nor an outage (that is retried):
            # the entries stay pending and come back through recovery or the janitor,
            # and after max_deliveries they are dead-lettered with this error.
            log.exception("batch crashed", extra={"event": "batch_crashed"})
            error = f"{type(exc).__name__}: {exc}"
            await self._guard("recording the error", lambda: record_errors(
                self.redis, self.keys, entries, error))
            self.stop(EXIT_CRASH)
        finally:
            metrics.INFLIGHT.dec()
            self._inflight.release()

    async def _drain(self) -> None:
        """Graceful stop: finish and acknowledge every batch we hold."""
        if not self._tasks:
            return
        budget = max(0.5, self.settings.graceful_timeout - 2.0)
        log.info("draining %d batches", len(self._tasks), extra={"event": "draining"})
        _, pending = await asyncio.wait(set(self._tasks), timeout=budget)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
            log.warning("%d batches left pending at shutdown", len(pending),
                        extra={"event": "drain_incomplete", "batches": len(pending)})

    # -- background loops ----------------------------------------------------
    def _beat(self) -> None:
        if self.heartbeat is not None:
            os.utime(self.heartbeat)

    async def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(2.0, self.settings.heartbeat_timeout / 5))
        while True:
            self._beat()
            await asyncio.sleep(interval)

    async def _lease_loop(self) -> None:
        try:
            await self.lease.keep_alive()
        except LeaseLost as exc:
            log.error("node lease lost: %s", exc, extra={"event": "lease_lost"})
            metrics.LEASE_LOST.inc()
            metrics.LEASE_HELD.set(0)
            self.stop(EXIT_LEASE_LOST)

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            await self._guard("discovery", self.reader.discover)

    async def _janitor_loop(self) -> None:
        # Slots start their janitor at different offsets so passes do not collide.
        await asyncio.sleep(self.settings.janitor_interval * (1 + self.slot % 4 / 4))
        while not self.stopping.is_set():
            if self.slot == 0:
                await self._guard("hand-made streams", self.janitor.find_hand_made_streams)
            found = await self._guard("reclaim", lambda: self.janitor.reclaim(
                list(self.reader.cursors)))
            if found and (found[0] or found[1]):
                metrics.RECLAIMED.inc(len(found[0]) + len(found[1]))
                log.info("reclaimed %d entries", len(found[0]) + len(found[1]),
                         extra={"event": "reclaimed", "entries": len(found[0])})
                self._submit(found[0], found[1], acquired=False)
            await asyncio.sleep(self.settings.janitor_interval)

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await call()
        except TRANSIENT_ERRORS as exc:
            log.warning("%s failed: %s", what, exc, extra={"event": "background_error"})
            return None

    async def _backoff(self, what: str, exc: BaseException, failures: int) -> None:
        delay = min(self.settings.retry_backoff_max, 0.05 * 2 ** min(failures, 10))
        log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay,
                    extra={"event": "retry", "stage": what, "attempt": failures})
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
        except TimeoutError:
            pass

    async def _close(self) -> None:
        for close in self._closers:
            try:
                await asyncio.wait_for(close(), 3)
            except Exception as exc:  # noqa: BLE001 - closing must go on
                log.debug("close failed: %s", exc)
        metrics.LEASE_HELD.set(0)


async def _until(deadline: float, connect: Callable[[], Awaitable[T]]) -> T:
    """Retry a connect until the boot deadline: services may still be starting."""
    delay = 0.1
    while True:
        try:
            return await connect()
        except CONNECT_ERRORS as exc:
            if time.monotonic() + delay >= deadline:
                raise BootError(str(exc)) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def run_worker(settings: Settings, slot: int, heartbeat: Path | None = None) -> int:
    """Entry point in the forked child; returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, not the tty
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(EXIT_OK))
    worker = Worker(settings, slot, heartbeat)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.stop)
        return await worker.run()

    return uvloop.run(main())
