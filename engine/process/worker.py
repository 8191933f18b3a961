"""A worker process: its own loop, connections, node ID and consumer name.

Everything here is created after fork. The worker reads batches and hands
each to the pipeline as a task, holding at most `max_inflight_batches`, so
batch k+1 is being read while batch k is logged and published, and a slow
dependency throttles reading instead of growing memory. The janitor's
reclaimed entries take the same slots, so they are bounded the same way.

Shutdown runs against one deadline, inside the supervisor's
`graceful_timeout`: stop reading, drain the batches held, cancel what is
left, close the connections.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from engine import backoff, exits, tracing
from engine.amqp.publisher import ConfirmPublisher
from engine.amqp.topology import RK_CREATED
from engine.config import Settings, default_engine_id
from engine.connections import RETRYABLE, TRANSIENT_ERRORS, connect_redis, create_pg_pool
from engine.errors import BootError, LeaseLost, SeckillError, ServiceUnavailable, one_line
from engine.fulfilment.releases import ReleaseRequests
from engine.fulfilment.status_consumer import StatusConsumer
from engine.keys import Keys
from engine.metrics import daemon as metrics
from engine.pipeline.autoreader import open_reader
from engine.pipeline.batches import Pipeline
from engine.pipeline.catalog import Catalog
from engine.pipeline.events import INSTANCE_CREATED, TYPE_NAMES
from engine.pipeline.faults import FAULTS, after_publish
from engine.pipeline.heap import settle_heap
from engine.pipeline.ids import NodeLease, Snowflake
from engine.pipeline.janitor import Janitor
from engine.pipeline.orderrows import prepare_connection
from engine.pipeline.orders import DeadLetter, Entry
from engine.pipeline.statewatch import StateWatch

log = logging.getLogger("seckill.worker")
SERVICE = "seckill-engine"  # the traces' service name (OTEL_SERVICE_NAME wins)

# Exit codes the supervisor acts on.

CLOSE_TIMEOUT = 3.0  # longest wait for one connection to close

T = TypeVar("T")
BOOT_ERRORS: tuple[type[BaseException], ...] = (SeckillError, *TRANSIENT_ERRORS)
BOOT_RETRY_MAX = 2.0  # a booting worker polls its services at least this often
CONNECT_ERRORS: tuple[type[BaseException], ...] = (ServiceUnavailable, *TRANSIENT_ERRORS)


def consumer_name(slot: int, engine_id: str | None = None) -> str:
    """`<engine_id>-<slot>`: stable per slot, so a respawned worker finds its predecessor's
    pending entries; distinct per host, so two hosts never read as one consumer."""
    return f"{engine_id or default_engine_id()}-{slot}"


class Worker:
    def __init__(self, settings: Settings, slot: int, heartbeat: Path | None = None,
                 parent: int | None = None) -> None:
        self.settings = settings
        self.slot = slot
        self.heartbeat = heartbeat
        self.parent = os.getppid() if parent is None else parent
        self.keys = Keys(settings.key_prefix)
        self.consumer = consumer_name(slot, settings.effective_engine_id())
        self.stopping = asyncio.Event()
        self.exit_code = exits.OK
        self._tasks: set[asyncio.Task] = set()
        self._inflight: asyncio.Semaphore | None = None
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self._draining = False
        self._deadline = math.inf  # monotonic time by which a stopping worker is gone

    # -- boot ---------------------------------------------------------------
    async def boot(self) -> None:
        """Connect to everything, retrying until the boot timeout; BootError if not."""
        deadline = time.monotonic() + self.settings.boot_timeout
        s = self.settings
        self.redis = await self._until(deadline, lambda: connect_redis(s))
        self._closers.append(self.redis.aclose)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = NodeLease(self.redis, self.keys, owner=owner, ttl_ms=s.node_lease_ttl_ms)
        await self._until(deadline, self.lease.acquire)
        self._closers.insert(0, self.lease.release)
        metrics.LEASE_HELD.set(1)
        self.pool = await self._until(deadline, lambda: create_pg_pool(
            s, size=s.max_inflight_batches + 2, init=prepare_connection))
        self._closers += [self.pool.close, self._terminate_pool]
        self.tracing = tracing.setup(s, SERVICE)  # (None at trace_sample 0)
        if self.tracing is not None:
            self._closers.append(functools.partial(asyncio.to_thread, self.tracing.close))
        self.publisher = ConfirmPublisher(s, RK_CREATED, TYPE_NAMES[INSTANCE_CREATED],
                                          after_send=after_publish)
        await self._until(deadline, self.publisher.connect)
        self._closers.append(self.publisher.close)
        self.pipeline = Pipeline(
            settings=s, keys=self.keys, redis=self.redis, pool=self.pool,
            publisher=self.publisher,
            catalog=Catalog(self.pool, s.product_cache_ttl, timeout=s.db_timeout),
            snowflake=Snowflake(self.lease.node_id, max_rollback_ms=s.max_clock_rollback_ms,
                                lease=self.lease),
            consumer=self.consumer, tracing=self.tracing)
        self.reader = open_reader(self.redis, self.keys, self.consumer, batch_size=s.batch_size,
                                  block_ms=s.block_ms, max_deliveries=s.max_deliveries)
        self.janitor = Janitor(self.redis, self.keys, self.consumer, idle_ms=s.claim_idle_ms,
                               count=s.batch_size, max_deliveries=s.max_deliveries)
        self.status = StatusConsumer(s, self.redis, self.pool, tracing=self.tracing)
        self.releases = ReleaseRequests(s, self.redis, self.pool, self.keys, self.consumer)
        self.watch = StateWatch(self.redis, self.keys, owner)
        await self._until(deadline, self.watch.arm)
        self._inflight = asyncio.Semaphore(s.max_inflight_batches)
        settle_heap()
        log.info("worker %d booted as %s, node %d", self.slot, self.consumer,
                 self.lease.node_id, extra={"event": "worker_booted", "slot": self.slot,
                                            "node_id": self.lease.node_id})

    async def _until(self, deadline: float, connect: Callable[[], Awaitable[T]]) -> T:
        """Retry a connect until the boot deadline: services may still be starting.
        A stop request ends the wait: nobody needs a worker that is going away."""
        attempt = 0
        while True:
            try:
                return await connect()
            except CONNECT_ERRORS as exc:
                attempt += 1
                delay = backoff.delay(attempt, BOOT_RETRY_MAX)
                if self.stopping.is_set() or time.monotonic() + delay >= deadline:
                    raise BootError(str(exc)) from exc
                await self._pause(delay)

    # -- run ------------------------------------------------------------------
    async def run(self) -> int:
        if not await self._boot_or_explain():
            await self._close()
            return self.exit_code if self.stopping.is_set() else exits.BOOT
        self._beat()
        background = self._start_background()
        try:
            await self._read_loop()
        except Exception:  # noqa: BLE001 - a bug: drain what we hold and let the supervisor respawn
            log.exception("reading crashed", extra={"event": "read_crashed"})
            self.stop(exits.FAILED)
        try:
            await self._drain()
        finally:
            await self._stop_background(background)
            await self._close()
        return self.exit_code

    async def _boot_or_explain(self) -> bool:
        """Boot; False after logging why not. Any failure is a boot failure (exits.BOOT), so
        the supervisor halts after `max_boot_failures` instead of respawning in a loop."""
        try:
            await self.boot()
            return True
        except BOOT_ERRORS as exc:
            log.error("worker %d failed to boot: %s", self.slot, exc,
                      extra={"event": "boot_failed", "slot": self.slot})
        except Exception:  # noqa: BLE001 - a bug at boot must not become a crash loop
            log.exception("worker %d failed to boot", self.slot,
                          extra={"event": "boot_failed", "slot": self.slot})
        return False

    def stop(self, code: int = exits.OK) -> None:
        if not self.stopping.is_set():
            self.exit_code = code
            self._deadline = time.monotonic() + _shutdown_budget(self.settings.graceful_timeout)
            self.stopping.set()

    def _left(self) -> float:
        """Seconds until the shutdown deadline (infinite while not stopping)."""
        return self._deadline - time.monotonic()

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
            except RETRYABLE as exc:
                self._inflight.release()
                failures += 1
                await self._backoff("read", exc, failures)
                continue
            self._submit(entries, dead)

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

    def _submit(self, entries: list[Entry], dead: Sequence[DeadLetter]) -> None:
        """Run a batch in the in-flight slot the caller holds (released when it is done).

        Once draining has begun nothing new starts: the drain would not wait for it and
        the connections would close under it. Entries not started stay pending on our
        consumer and are re-read by the next worker in this slot.
        """
        assert self._inflight is not None
        if (not entries and not dead) or self._draining:
            self._inflight.release()
            return
        task = asyncio.create_task(self._run_batch(entries, dead))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, entries: list[Entry], dead: Sequence[DeadLetter]) -> None:
        assert self._inflight is not None
        metrics.INFLIGHT.inc()
        try:
            await self.pipeline.process(entries, dead)
        except LeaseLost as exc:
            log.error("node lease lost; stopping: %s", exc, extra={"event": "lease_lost"})
            metrics.LEASE_LOST.inc()
            self.stop(exits.LEASE_LOST)
        except Exception as exc:
            # A bug, not bad data (that is dead-lettered) nor an outage (that is retried):
            # the entries stay pending and come back through recovery or the janitor,
            # and after max_deliveries they are dead-lettered with this error.
            log.exception("batch crashed", extra={"event": "batch_crashed"})
            await self._guard("recording the error",
                              functools.partial(self.pipeline.record_crash, entries, exc))
            self.stop(exits.FAILED)
        finally:
            metrics.INFLIGHT.dec()
            self._inflight.release()

    async def _drain(self) -> None:
        """Graceful stop: finish and acknowledge every batch we hold, by the deadline.

        It waits until no batch is left (not for a snapshot), leaving time to close the
        connections; what is still running then is cancelled and stays pending.
        """
        self._draining = True
        reserve = _close_reserve(self.settings.graceful_timeout)
        if self._tasks:
            log.info("draining %d batches", len(self._tasks), extra={"event": "draining"})
        while self._tasks and self._left() > reserve:
            await asyncio.wait(set(self._tasks), timeout=self._left() - reserve)
        if self._tasks:
            left = set(self._tasks)
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=max(0.05, min(1.0, self._left() - reserve / 2)))
            log.warning("%d batches left pending at shutdown", len(left),
                        extra={"event": "drain_incomplete", "batches": len(left)})

    # -- background loops ----------------------------------------------------
    def _start_background(self) -> list[asyncio.Task]:
        loops = {"heartbeat": self._heartbeat_loop(), "lease": self._lease_loop(),
                 "discovery": self._discovery_loop(), "janitor": self._janitor_loop(),
                 "status": self.status.run(self.stopping),
                 "releases": self.releases.run(self.stopping)}
        tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
        for task in tasks:
            task.add_done_callback(self._on_background_done)
        return tasks

    def _on_background_done(self, task: asyncio.Task) -> None:
        """A background loop only ends when we stop. One that ends earlier (a bug, a
        non-transient error) would leave the worker reading without it, unnoticed:
        stop instead, and the supervisor respawns the worker."""
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        log.error("background task %s ended unexpectedly: %s", task.get_name(),
                  one_line(exc, typed=True) if exc else "returned", exc_info=exc,
                  extra={"event": "background_died", "task": task.get_name()})
        self.stop(exits.FAILED)

    async def _stop_background(self, tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        reserve = _close_reserve(self.settings.graceful_timeout)
        await asyncio.wait(tasks, timeout=max(0.05, min(1.0, self._left() - reserve / 2)))

    def _beat(self) -> None:
        if self.heartbeat is not None:
            os.utime(self.heartbeat)

    async def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(2.0, self.settings.heartbeat_timeout / 5))
        while not self.orphaned():
            self._beat()
            await asyncio.sleep(interval)
        # Our supervisor is gone (SIGKILLed): nobody watches us, and a new one will start
        # workers with our consumer names beside us. Drain as on SIGTERM and leave.
        log.error("worker %d: supervisor %d is gone; draining and exiting", self.slot,
                  self.parent, extra={"event": "orphaned", "slot": self.slot})
        self.stop()

    def orphaned(self) -> bool:
        """True once we were re-parented (to init or a subreaper): as gunicorn's workers
        check, the parent PID is no longer the supervisor's we were forked by."""
        return os.getppid() != self.parent

    async def _lease_loop(self) -> None:
        try:
            await self.lease.keep_alive()
        except LeaseLost as exc:
            # a Redis that came back empty takes the lease with it: say that first
            await self._guard("state check", self.watch.check)
            log.error("node lease lost: %s", exc, extra={"event": "lease_lost"})
            metrics.LEASE_LOST.inc()
            metrics.LEASE_HELD.set(0)
            self.stop(exits.LEASE_LOST)

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            await self._guard("state check", self.watch.check)
            await self._guard("discovery", self.reader.discover)

    async def _janitor_loop(self) -> None:
        # Slots start their janitor at different offsets so passes do not collide.
        await self._pause(self.settings.janitor_interval * (1 + self.slot % 4 / 4))
        while not self.stopping.is_set():
            if self.slot == 0:
                await self._guard("hand-made streams", self.janitor.find_hand_made_streams)
                await self._guard("gone consumers", lambda: self.janitor.forget_gone_consumers(
                    list(self.reader.cursors)))
            await self._reclaim()
            await self._pause(self.settings.janitor_interval)

    async def _reclaim(self) -> None:
        """One janitor pass, only into a free in-flight slot (else skip it).

        Reclaimed work then starts at once and is bounded like read work: it never
        waits unclaimed-looking long enough for a later pass to reclaim it again.
        """
        assert self._inflight is not None
        if self._inflight.locked() or self.stopping.is_set():
            return
        await self._inflight.acquire()  # free: returns without waiting
        try:
            found = await self._guard("reclaim", lambda: self.janitor.reclaim(
                list(self.reader.cursors)))
        except BaseException:
            self._inflight.release()
            raise
        entries, dead = found or ([], [])
        if entries or dead:
            metrics.RECLAIMED.inc(len(entries) + len(dead))
            log.info("reclaimed %d entries", len(entries) + len(dead),
                     extra={"event": "reclaimed", "entries": len(entries) + len(dead)})
        self._submit(entries, dead)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up as soon as we are told to stop."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await call()
        except RETRYABLE as exc:
            log.warning("%s failed: %s", what, exc, extra={"event": "background_error"})
            return None

    async def _backoff(self, what: str, exc: BaseException, failures: int) -> None:
        delay = backoff.delay(failures, self.settings.retry_backoff_max)
        log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay,
                    extra={"event": "retry", "stage": what, "attempt": failures})
        await self._pause(delay)

    async def _close(self) -> None:
        """Close every connection, each within what is left of the shutdown deadline."""
        for close in self._closers:
            try:
                await asyncio.wait_for(close(), max(0.05, min(CLOSE_TIMEOUT, self._left())))
            except Exception as exc:  # noqa: BLE001 - closing must go on
                log.debug("close failed: %s", exc)
        metrics.LEASE_HELD.set(0)

    async def _terminate_pool(self) -> None:
        # After pool.close(): a no-op if it finished, else drops what it left open in time.
        self.pool.terminate()


def _shutdown_budget(graceful_timeout: float) -> float:
    """Seconds a stopping worker takes at most: a margin inside the supervisor's
    `graceful_timeout`, so it exits on its own before it would be SIGKILLed."""
    return graceful_timeout - min(2.0, graceful_timeout / 5)


def _close_reserve(graceful_timeout: float) -> float:
    """Seconds of the shutdown budget kept for closing the connections."""
    return min(CLOSE_TIMEOUT, _shutdown_budget(graceful_timeout) / 4)


def run_worker(settings: Settings, slot: int, heartbeat: Path | None = None,
               parent: int | None = None) -> int:
    """Entry point in the forked child; returns the exit code. `parent`: the supervisor's
    PID taken before the fork (it may already be gone when the child first runs)."""
    # First of all: a SIGTERM that arrives before the loop takes it over must not reach
    # the supervisor's inherited handler (it would be lost); remember it instead.
    early_term: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: early_term.append(signum))
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(exits.OK))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, not the tty
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)
    worker = Worker(settings, slot, heartbeat, parent)
    FAULTS.arm_from_env(os.environ, worker.parent)  # tests only: unset, nothing is armed

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.stop)
        if early_term:
            worker.stop()
        return await worker.run()

    return uvloop.run(main())
