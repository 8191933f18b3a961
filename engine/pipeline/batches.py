"""`Pipeline`: one batch, stage by stage: decode, look up, take IDs, log, publish, settle.

Each stage is a function of its own module; this one only orders them, times
them, and decides what a failure means. Bad data is dead-lettered at once; a failing
service is retried in place with backoff (the entries stay pending and are
re-claimed to us so no janitor takes them), because the order is fine and
only the world is broken. Nothing is acknowledged unless its row is
committed and its event confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine import backoff
from engine.amqp.publisher import ConfirmPublisher
from engine.config import Settings
from engine.connections import RETRYABLE
from engine.errors import ServiceError, one_line
from engine.keys import Keys
from engine.metrics import daemon as metrics
from engine.pipeline.catalog import Catalog, drop_unknown
from engine.pipeline.events import build_events, sort_confirmed
from engine.pipeline.faults import AFTER_CONFIRMS, AFTER_LOG_COMMIT, AFTER_READ, FAULTS
from engine.pipeline.ids import Snowflake, assign_ids
from engine.pipeline.orderrows import write_batch
from engine.pipeline.orders import DeadLetter, Entry, Order, decode_batch, entry_ms
from engine.pipeline.ordertrace import BatchTrace, sampled_parents
from engine.pipeline.redelivery import error_keys, hold, record_errors
from engine.pipeline.settle import settle
from engine.tracing import Tracing

log = logging.getLogger("seckill.pipeline")


class Pipeline:
    """Runs batches for one worker; owns no connection, only borrows them."""

    def __init__(self, *, settings: Settings, keys: Keys, redis: Redis, pool: asyncpg.Pool,
                 publisher: ConfirmPublisher, catalog: Catalog, snowflake: Snowflake,
                 consumer: str, clock: Callable[[], float] = time.time,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.keys = keys
        self.redis = redis
        self.pool = pool
        self.publisher = publisher
        self.catalog = catalog
        self.snowflake = snowflake
        self.consumer = consumer
        self.clock = clock
        self.tracing = tracing

    async def process(self, entries: list[Entry], extra_dead: Sequence[DeadLetter] = ()) -> None:
        """Take a batch all the way to acknowledged (or dead-lettered)."""
        if FAULTS.armed and FAULTS.reached(AFTER_READ):
            FAULTS.kill()
        t0 = time.perf_counter()
        metrics.BATCH_SIZE.observe(len(entries))
        tracing = self.tracing
        others: list[int] | None = None if tracing is None else []
        orders, dead = decode_batch(entries, self.keys, self.settings.max_entry_bytes, others)
        dead.extend(extra_dead)
        # (only an entry the decode did not take as the gate's common one has a context)
        if others and tracing is not None:
            parents = sampled_parents(tracing, entries, others)
            if parents is not None:  # (a batch without a sampled order: nothing more)
                trace = BatchTrace(tracing, parents, len(entries))
                try:
                    return await self._prepared(t0, orders, dead, trace)
                finally:
                    trace.end()
        await self._prepared(t0, orders, dead)

    async def _prepared(self, t0: float, orders: list[Order], dead: list[DeadLetter],
                        trace: BatchTrace | None = None) -> None:
        # the dead letters are held too: a long outage must not let a janitor take them
        products, failures = await self._retrying("lookup", lambda: self.catalog.lookup(
            o.product_id for o in orders), [*orders, *dead])
        orders = drop_unknown(orders, products, dead)
        assign_ids(orders, self.snowflake)
        prefixes = {pid: prefix for pid, (_, prefix) in products.items()}
        t1 = time.perf_counter()
        metrics.STAGE_SECONDS.labels("prepare").observe(t1 - t0)
        await self._deliver(orders, dead, prefixes, failures, trace)

    async def record_crash(self, entries: list[Entry], exc: BaseException) -> None:
        """Remember the error of a batch that crashed (a bug, neither bad data nor an
        outage) on its entries: they stay pending, come back through recovery or the
        janitor, and after `max_deliveries` become dead letters that carry it."""
        await record_errors(self.redis, self.keys, entries, one_line(exc, typed=True))

    async def _deliver(self, orders: list[Order], dead: list[DeadLetter],
                       prefixes: dict[int, bytes], attempt: int = 0,
                       trace: BatchTrace | None = None) -> None:
        batch = _BatchProgress(orders, [], dead, trace)
        while True:
            try:
                if batch.todo:
                    await self._log(batch)
                    await self._publish(batch, prefixes)
                # errors were recorded for this batch only if an attempt failed
                with _stage(trace, "ack", "acked", batch.done):
                    if trace is not None:
                        trace.dead_lettered(d.entry_id for d in batch.dead)
                    await self._settle(batch.done, batch.dead,
                                       error_keys(self.keys, batch.held()) if attempt else ())
                batch.done, batch.dead = [], []
                if not batch.todo:
                    return
                raise _Unconfirmed(len(batch.todo))
            except RETRYABLE as exc:
                attempt += 1
                await self._after_failure(exc, attempt, batch.held())

    async def _log(self, batch: _BatchProgress) -> None:
        """Log `batch.todo`: refused orders become dead letters, redelivered ones take
        the instance ID they were logged with first."""
        t0 = time.perf_counter()
        try:
            with _stage(batch.trace, "log", "logged", batch.todo):
                result = await write_batch(self.pool, batch.todo, self.settings.db_timeout)
        except RETRYABLE:
            metrics.BATCH_FAILURES.labels("log").inc()
            raise
        if FAULTS.armed and FAULTS.reached(AFTER_LOG_COMMIT):
            FAULTS.kill()
        metrics.STAGE_SECONDS.labels("log").observe(time.perf_counter() - t0)
        batch.dead.extend(result.refused)
        batch.todo = result.logged
        if result.redelivered:
            metrics.REDELIVERED.inc(result.redelivered)

    async def _publish(self, batch: _BatchProgress, prefixes: dict[int, bytes]) -> None:
        """Publish `batch.todo`: confirmed orders move to `batch.done`, the others stay."""
        t0 = time.perf_counter()
        bodies, ids = build_events(batch.todo, prefixes, int(self.clock()))
        try:
            with _stage(batch.trace, "publish", "published", batch.todo):
                headers = None if batch.trace is None else batch.trace.headers(batch.todo)
                outcomes = await self.publisher.publish_bodies(
                    bodies, ids, self.settings.publish_timeout, headers)
        except RETRYABLE:
            metrics.BATCH_FAILURES.labels("publish").inc()
            await self.publisher.close()
            raise
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - t0)
        if FAULTS.armed and FAULTS.reached(AFTER_CONFIRMS):
            FAULTS.kill()
        confirmed, batch.todo, why = sort_confirmed(batch.todo, outcomes)
        batch.done += confirmed
        for outcome, count in why.items():
            metrics.PUBLISH_FAILURES.labels(outcome).inc(count)

    async def _settle(self, done: list[Order], dead: list[DeadLetter],
                      errors: Iterable[str] = ()) -> None:
        t0 = time.perf_counter()
        try:
            await settle(self.redis, done, dead, self.consumer, errors)
        except RETRYABLE:
            metrics.BATCH_FAILURES.labels("ack").inc()
            raise
        now = self.clock()
        metrics.STAGE_SECONDS.labels("ack").observe(time.perf_counter() - t0)
        if done:
            metrics.ORDERS.inc(len(done))
            metrics.observe_many(metrics.ORDER_LATENCY,
                                 (now - entry_ms(o.entry_id) / 1000 for o in done))
        for reason in {d.reason for d in dead}:
            metrics.DEAD_LETTERS.labels(reason).inc(sum(d.reason == reason for d in dead))
        if dead:
            log.warning("dead-lettered %d entries", len(dead),
                        extra={"event": "dead_letter", "count": len(dead),
                               "reasons": sorted({d.reason for d in dead})})

    async def _retrying(self, stage: str, call: Callable,
                        held: list[Order | DeadLetter]) -> tuple[dict, int]:
        """The call's result once it succeeds, and how many attempts failed before."""
        attempt = 0
        while True:
            try:
                return await call(), attempt
            except RETRYABLE as exc:
                attempt += 1
                metrics.BATCH_FAILURES.labels(stage).inc()
                await self._after_failure(exc, attempt, held)

    async def _after_failure(self, exc: BaseException, attempt: int,
                             held: list[Order] | list[Order | DeadLetter]) -> None:
        delay = backoff.delay(attempt, self.settings.retry_backoff_max)
        log.warning("batch attempt %d failed, retrying in %.2fs: %s", attempt, delay,
                    one_line(exc, typed=True), extra={"event": "batch_retry", "attempt": attempt,
                                           "entries": len(held)})
        await asyncio.sleep(delay)
        if held:
            try:
                await hold(self.redis, self.keys, self.consumer, held, one_line(exc, typed=True))
            except RETRYABLE:
                pass  # Redis is down too; the next attempt will find out


@dataclass(slots=True)
class _BatchProgress:
    """Where each order of a batch stands while it is being retried."""

    todo: list[Order]
    done: list[Order]
    dead: list[DeadLetter]
    trace: BatchTrace | None = None  # when it holds sampled orders

    def held(self) -> list[Order | DeadLetter]:
        return [*self.todo, *self.done, *self.dead]


_NO_STAGE = contextlib.nullcontext()


def _stage(trace: BatchTrace | None, name: str, event: str,
           orders: list[Order]) -> contextlib.AbstractContextManager[Any]:
    """The stage's spans (BatchTrace.stage) for a batch holding sampled orders; else a
    context that does nothing."""
    if trace is None:
        return _NO_STAGE
    return trace.stage(name, event, orders)


class _Unconfirmed(ServiceError):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} events not confirmed")

