"""`seckill resource-domain`: the reference Resource Domain (simulated provisioning).

Consumes INSTANCE_CREATED from `resource.instance-created`, provisions each
instance once, and reports INSTANCE_RUNNING or INSTANCE_FAILED on
`instance.status` with publisher confirms; a message is acknowledged only
after its report is confirmed.

Events arrive at least once (and our own engine may publish one twice), so
it keeps what it has provisioned in its own table,
`resource_domain.instances`: an instance is claimed there before it is
provisioned, and a redelivered event re-sends the recorded outcome instead
of provisioning again.

It also consumes INSTANCE_RELEASED from `resource.instance-released` and deletes
the instance (`releases`). A claim belongs to a live process: each Resource
Domain holds an advisory lock for its owner number while it runs, so the claims of
one that died are taken over as soon as its events come back (`claims`).

Only the engine's broker user may order or release an instance: anyone else's event (a
forged INSTANCE_CREATED for a miner image, say) is kept with its reason in
`resource_domain.dead_letters`, counted in `seckill_rd_dead_letters_total` and
acknowledged, never provisioned.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import start_http_server

from engine import tracing
from engine.amqp.consumer import BatchingConsumer, Delivery
from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, user_of
from engine.amqp.publisher import CONFIRMED, ConfirmPublisher, Message
from engine.amqp.topology import QUEUE_CREATED, QUEUE_RELEASED, RK_STATUS
from engine.config import Settings
from engine.connections import PG_ERRORS, create_pg_pool
from engine.errors import ConfigError, PublishFailed, ServiceUnavailable
from engine.metrics import resource_domain as metrics
from engine.orderstates import FAILED, RELEASED, RELEASING, RUNNING
from engine.pb import event_pb2
from engine.resource_domain.claims import DEAD_CLAIM, OwnerLock
from engine.resource_domain.provisioning import Provisioned, Provisioner, make_provisioner
from engine.resource_domain.releases import Releases
from engine.tracing import Tracing

log = logging.getLogger("seckill.resource_domain")
SERVICE = "seckill-resource-domain"  # the traces' service name (OTEL_SERVICE_NAME wins)

# the schema is made by `seckill migrate`, owned by seckill_resource_domain
SCHEMA = """
CREATE TABLE IF NOT EXISTS resource_domain.instances (
    instance_id    BIGINT PRIMARY KEY,
    user_id        BIGINT NOT NULL,
    status         TEXT NOT NULL,  -- PROVISIONING, RUNNING, FAILED, RELEASING, RELEASED
    endpoint       TEXT,
    reason         TEXT,
    manifest       TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    claimed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at    TIMESTAMPTZ
);
-- whose claim (claims.OwnerLock), and when a release deleted the instance
ALTER TABLE resource_domain.instances ADD COLUMN IF NOT EXISTS owner BIGINT;
ALTER TABLE resource_domain.instances ADD COLUMN IF NOT EXISTS released_at TIMESTAMPTZ;
"""

DEAD_LETTERS = """
CREATE TABLE IF NOT EXISTS resource_domain.dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    sender         TEXT NOT NULL,
    body           BYTEA NOT NULL,
    at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""
DEAD_LETTER = """
INSERT INTO resource_domain.dead_letters (reason, detail, sender, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
"""

CLAIM = """
INSERT INTO resource_domain.instances (instance_id, user_id, status, owner)
SELECT id, uid, 'PROVISIONING', $3 FROM unnest($1::bigint[], $2::bigint[]) AS u(id, uid)
ON CONFLICT (instance_id) DO NOTHING RETURNING instance_id
"""
# a claim nobody finished whose owner is dead (claims.DEAD_CLAIM): ours now; or ours
# already (a delivery of ours that failed halfway comes back to us)
RECLAIM = f"""
UPDATE resource_domain.instances SET claimed_at = now(), owner = $2
WHERE instance_id = ANY($1::bigint[]) AND status = 'PROVISIONING'
  AND (owner = $2 OR {DEAD_CLAIM})
RETURNING instance_id
"""
STATE = """
SELECT instance_id, status, endpoint, reason FROM resource_domain.instances
WHERE instance_id = ANY($1::bigint[])
"""
FINISH = """
UPDATE resource_domain.instances AS i
SET status = u.status, endpoint = u.endpoint, reason = u.reason, manifest = u.manifest,
    attempts = i.attempts + 1, finished_at = now()
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
     AS u(instance_id, status, endpoint, reason, manifest)
WHERE i.instance_id = u.instance_id AND i.status = 'PROVISIONING' AND i.owner = $6
"""
# what a duplicate INSTANCE_CREATED is answered with: it ran (and may be gone since)
RAN = (RUNNING, RELEASING, RELEASED)


@dataclass(slots=True)
class CreatedEvent:
    """An INSTANCE_CREATED delivery, decoded."""

    tag: int
    event: event_pb2.Event
    waited: bool = False  # back in the inbox: its instance was claimed by someone else
    trace: Any = None  # a sampled order's context, from the message's headers
    span: Any = None  # its provisioning span, once started


def count_duplicates(batch: list[CreatedEvent], mine: set[int]) -> int:
    """Deliveries that provision nothing: all but the first of each instance we claimed.

    A delivery put back to wait for another Resource Domain's claim was
    counted when it arrived, so it is not counted again on every retry.
    """
    firsts: set[int] = set()
    duplicates = 0
    for d in batch:
        if d.waited:
            continue
        if d.event.instance_id in mine and d.event.instance_id not in firsts:
            firsts.add(d.event.instance_id)
        else:
            duplicates += 1
    return duplicates


class ResourceDomain:
    def __init__(self, settings: Settings, provisioner: Provisioner | None = None,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing  # continues a sampled order's trace (engine.tracing)
        self.provisioner = provisioner or make_provisioner(settings)
        self.publisher = ConfirmPublisher(settings, RK_STATUS, "INSTANCE_RUNNING",
                                          component=RESOURCE_DOMAIN)
        self._waiting: list[CreatedEvent] = []  # claimed by another Resource Domain: ask again
        self.orderer = user_of(settings, ENGINE)  # the only user trusted to order instances
        self.consumer = BatchingConsumer(
            settings, QUEUE_CREATED, component=RESOURCE_DOMAIN, trusted=self.orderer,
            prefetch=settings.rd_prefetch, batch_size=1, handle=self.flush,
            untrusted=self.refuse_untrusted, on_reset=self._forget_waiting,
            name="resource domain")
        self.claims = OwnerLock(settings.rd_dsn(), timeout=settings.db_timeout)
        self.release_consumer = BatchingConsumer(
            settings, QUEUE_RELEASED, component=RESOURCE_DOMAIN, trusted=self.orderer,
            prefetch=settings.rd_prefetch, batch_size=settings.rd_prefetch,
            handle=self._flush_releases, untrusted=self._refuse_untrusted_release,
            on_reset=self._forget_releases, name="resource domain releases")
        self.releases: Releases | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        # as seckill_resource_domain: its own schema, never seckill_logs
        self.pool = await create_pg_pool(self.settings.replace(pg_dsn=self.settings.rd_dsn()),
                                         size=3)
        async with self.pool.acquire() as conn:
            await conn.execute(SCHEMA)
            await conn.execute(DEAD_LETTERS)
        self.releases = Releases(self.pool, self.claims, self.provisioner, self.publisher,
                                 ack=self.release_consumer.ack,
                                 dead_letter=self._dead_letter_release,
                                 publish_timeout=self.settings.publish_timeout)
        try:
            await asyncio.gather(self.consumer.run(stopping),
                                 self.release_consumer.run(stopping),
                                 self.claims.keep_alive(stopping))
        finally:
            await self.publisher.close()
            await self.claims.close()
            await self.pool.close()

    async def _owner(self) -> int:
        """This process's owner number for a claim; an outage is retried by the consumer."""
        try:
            return await self.claims.owner()
        except PG_ERRORS as exc:
            raise ServiceUnavailable(f"PostgreSQL: the claims lock: {exc}") from exc

    async def _flush_releases(self, arrived: list[Delivery]) -> None:
        assert self.releases is not None
        await self._owner()  # a lock to claim with, or a retried outage
        await self.releases.flush(arrived)

    def _forget_releases(self) -> None:
        if self.releases is not None:
            self.releases.forget_waiting()

    async def _dead_letter_release(self, deliveries: list[Delivery], reason: str,
                                   details: list[str]) -> None:
        await self.dead_letter(deliveries, reason, details, self.release_consumer)

    async def _refuse_untrusted_release(self, deliveries: list[Delivery]) -> None:
        await self.refuse_untrusted(deliveries, self.release_consumer)

    async def dead_letter(self, deliveries: list[Delivery], reason: str, details: list[str],
                          consumer: BatchingConsumer) -> None:
        """Keep refused deliveries with their reason; acknowledge them on `consumer`."""
        async with self.pool.acquire() as conn:
            await conn.execute(DEAD_LETTER, [reason] * len(deliveries), details,
                               [d.user_id for d in deliveries], [d.body for d in deliveries])
        metrics.DEAD_LETTERS.labels(reason).inc(len(deliveries))
        for detail in details:
            log.warning("event dead-lettered: %s", detail,
                        extra={"event": "rd_dead_letter", "reason": reason})
        await consumer.ack({d.tag for d in deliveries})

    async def refuse_untrusted(self, deliveries: list[Delivery],
                               consumer: BatchingConsumer | None = None) -> None:
        """Events from any broker user but the engine's: kept with the reason, never
        provisioned or released."""
        details = [f"sent by broker user {d.user_id or '(none)'}; only {self.orderer} "
                   "orders and releases instances" for d in deliveries]
        await self.dead_letter(deliveries, "untrusted_sender", details,
                               consumer or self.consumer)

    def _forget_waiting(self) -> None:
        """Deliveries of a lost channel: the broker delivers them again."""
        self._waiting = []

    async def flush(self, arrived: list[Delivery]) -> None:
        """Provision and report what arrived and what was put back to wait."""
        batch, self._waiting = self._waiting, []  # those put back arrived first
        for delivery in arrived:
            try:
                event = event_pb2.Event.FromString(delivery.body)
            except Exception:  # noqa: BLE001 - garbage on the queue: drop it, loudly
                log.error("undecodable message dropped", extra={"event": "rd_bad_message"})
                await self._ack({delivery.tag})
                continue
            batch.append(CreatedEvent(delivery.tag, event))
            if self.tracing is not None and delivery.headers:
                batch[-1].trace = self.tracing.from_headers(delivery.headers)
        if not batch:
            return
        if self.tracing is not None:
            self._start_spans(batch)
        outcomes = await self.handle(batch)
        await self.report(batch, outcomes)

    def _start_spans(self, batch: list[CreatedEvent]) -> None:
        """A provisioning span for each sampled order's event (kept while it waits)."""
        assert self.tracing is not None
        for d in batch:
            if d.trace is not None and d.span is None:
                d.span = self.tracing.start(
                    "resource_domain.provision", d.trace, kind="consumer",
                    attributes={"seckill.instance_id": str(d.event.instance_id)})

    async def handle(self, batch: list[CreatedEvent]) -> dict[int, Provisioned]:
        """Provision what nobody has claimed yet; return every instance's outcome."""
        ids = list({d.event.instance_id: None for d in batch})
        events = {d.event.instance_id: d.event for d in batch}
        owner = await self._owner()
        async with self.pool.acquire() as conn:
            mine = {r[0] for r in await conn.fetch(
                CLAIM, ids, [events[i].user_id for i in ids], owner)}
            mine |= {r[0] for r in await conn.fetch(RECLAIM, ids, owner)}
        metrics.DUPLICATES.inc(count_duplicates(batch, mine))
        results = await asyncio.gather(*(self.provisioner.provision(events[i]) for i in mine))
        fresh = dict(zip(mine, results, strict=True))
        if fresh:
            async with self.pool.acquire() as conn:
                await conn.execute(FINISH, list(fresh),
                                   [RUNNING if p.ok else FAILED for p in fresh.values()],
                                   [p.endpoint for p in fresh.values()],
                                   [p.reason for p in fresh.values()],
                                   [p.manifest for p in fresh.values()], owner)
            for p in fresh.values():
                metrics.PROVISIONED.labels("running" if p.ok else "failed").inc()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(STATE, ids)
        return {r["instance_id"]: Provisioned(r["status"] in RAN, r["endpoint"] or "",
                                              r["reason"] or "")
                for r in rows if r["status"] != "PROVISIONING"}

    async def report(self, batch: list[CreatedEvent], outcomes: dict[int, Provisioned]) -> None:
        """Publish each outcome; acknowledge a delivery once its report is confirmed."""
        ready = [d for d in batch if d.event.instance_id in outcomes]
        messages = [self._status_message(d.event, outcomes[d.event.instance_id], d.span)
                    for d in ready]
        results = await self.publisher.publish(messages, self.settings.publish_timeout)
        for d, result in zip(ready, results, strict=True):
            if d.span is not None:  # the status report carries its context on
                d.span.set_attribute("seckill.report", result)
                d.span.set_attribute("seckill.running", outcomes[d.event.instance_id].ok)
                d.span.end()
        await self._ack({d.tag for d, r in zip(ready, results, strict=True) if r == CONFIRMED})
        waiting = [d for d in batch if d.event.instance_id not in outcomes]
        for d in waiting:
            d.waited = True
        self._waiting.extend(waiting)  # claimed by another Resource Domain: ask again later
        if any(r != CONFIRMED for r in results):
            raise PublishFailed("status reports not confirmed")

    async def _ack(self, tags: set[int]) -> None:
        await self.consumer.ack(tags)

    def _status_message(self, event: event_pb2.Event, outcome: Provisioned,
                        span: Any = None) -> Message:
        kind = event_pb2.INSTANCE_RUNNING if outcome.ok else event_pb2.INSTANCE_FAILED
        body = event_pb2.Event(
            event_type=kind, instance_id=event.instance_id, user_id=event.user_id,
            name=event.name, spec=event.spec, timestamp=int(time.time()),
            product_id=event.product_id, stream_id=event.stream_id, sale_id=event.sale_id,
            slot=event.slot, endpoint=outcome.endpoint, reason=outcome.reason,
        ).SerializeToString()
        return Message(body, str(event.instance_id),
                       "INSTANCE_RUNNING" if outcome.ok else "INSTANCE_FAILED",
                       None if span is None or self.tracing is None
                       else self.tracing.headers(span))


def serve_metrics(settings: Settings) -> int:
    """Serve /metrics (`seckill_rd_*`) from a thread; returns the port, 0 when disabled.

    The Resource Domain is one process, so prometheus_client's own server and
    default registry are enough. A port that cannot be bound stops the
    process: a Resource Domain nobody can see is worse than one that did not start.
    """
    port = settings.rd_metrics_port
    if port == 0:
        return 0
    if not 0 < port < 65536:
        raise ConfigError(f"rd_metrics_port: expected 0..65535, got {port!r}")
    try:
        server, _ = start_http_server(port, addr=settings.metrics_host)
    except OSError as exc:
        raise ConfigError(f"rd_metrics_port: cannot listen on {settings.metrics_host}:{port}"
                          f" ({exc.strerror or exc})") from None
    bound = int(server.server_address[1])
    log.info("serving /metrics on %s:%d", settings.metrics_host, bound,
             extra={"event": "http_started", "port": bound})
    return bound


def main(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT."""
    import uvloop

    serve_metrics(settings)

    async def run() -> int:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        traced = tracing.setup(settings, SERVICE)
        try:
            await ResourceDomain(settings, tracing=traced).run(stopping)
        finally:
            if traced is not None:  # (what it holds is exported, within 2 s)
                await asyncio.to_thread(traced.close)
        return 0
    return uvloop.run(run())
