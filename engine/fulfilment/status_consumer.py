"""The engine's side of the closed loop: instance status reports into `seckill_logs`.

Reports arrive at least once and in any order, so applying one must be
idempotent and monotonic: only a `PROCESSING` row changes, into `RUNNING` or
`FAILED`, and never back. A failed order hands its unit of stock back to its
sale (if that sale is still the open one), exactly once: the database marks
the order compensated and the gate's `refunded` set refuses a second return
even if we crash between the two.

Only the Resource Domain's broker user may report (`engine.amqp.logins`), and a
report must name the user and product of the order it changes: instance IDs are
guessable, so a report that names a victim's instance with anything else of
theirs wrong is dead-lettered, never applied. Reports the consumer refuses go to
the status dead-letter stream with their reason, counted by reason in
`seckill_status_dead_letters_total` (alerted on in engine/deploy/alerts.yml).

A release is reported INSTANCE_RELEASED: it moves only a `RELEASING` row (the
engine asked for it, `engine.fulfilment.releases`) to `RELEASED`, and hands the
unit on exactly as a failed order's: to the waitlist's head or back to stock
(the gate's refund script), marked in `compensated_at`. A duplicate RELEASED
report is acknowledged; one for a row in any other state is dead-lettered
(`release_out_of_order`): nobody asked for that release.

It runs as a task in every worker (N consumers on one queue): no extra
process to supervise, and it lives and dies with the workers' connections.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from engine.amqp.consumer import BatchingConsumer, Delivery
from engine.amqp.logins import ENGINE, RESOURCE_DOMAIN, user_of
from engine.amqp.topology import QUEUE_STATUS
from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.metrics import daemon as metrics
from engine.orderstates import FAILED, RELEASED, RELEASING, RUNNING
from engine.pb import event_pb2
from engine.tracing import Tracing

log = logging.getLogger("seckill.status")

ORDER_STATE_OF_EVENT = {event_pb2.INSTANCE_RUNNING: RUNNING, event_pb2.INSTANCE_FAILED: FAILED,
                        event_pb2.INSTANCE_RELEASED: RELEASED}
EVENT_OF_ORDER_STATE = {state: event for event, state in ORDER_STATE_OF_EVENT.items()}

APPLY = """
UPDATE seckill_logs AS l
SET status = u.status, endpoint = NULLIF(u.endpoint, ''), reason = NULLIF(u.reason, ''),
    status_at = u.at, updated_at = now()
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     AS u(instance_id, status, endpoint, reason, at)
WHERE l.instance_id = u.instance_id AND l.status = 'PROCESSING'
"""

# a release: only the row the engine moved to RELEASING
APPLY_RELEASED = """
UPDATE seckill_logs SET status = 'RELEASED', released_at = u.at, updated_at = now()
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(instance_id, at)
WHERE seckill_logs.instance_id = u.instance_id AND seckill_logs.status = 'RELEASING'
"""

KNOWN = """
SELECT instance_id, user_id, product_id, status FROM seckill_logs
WHERE instance_id = ANY($1::bigint[])
"""

# Failed or released orders of this batch whose unit has not been handed on yet (also
# ones whose earlier hand-off was interrupted: the gate's refunded set keeps it exactly
# once).
TO_COMPENSATE = """
SELECT instance_id, product_id, user_id, sale_id, slot, stream_id, status FROM seckill_logs
WHERE instance_id = ANY($1::bigint[]) AND status IN ('FAILED', 'RELEASED')
  AND compensated_at IS NULL
"""

MARK_COMPENSATED = """
UPDATE seckill_logs SET compensated_at = now() WHERE instance_id = ANY($1::bigint[])
"""


@dataclass(slots=True)
class Report:
    delivery_tag: int
    instance_id: int
    status: str
    endpoint: str
    reason: str
    at: dt.datetime
    first_seen: float
    user_id: int = 0  # whose order the report says it is: checked against the row
    product_id: int = 0
    trace: Any = None  # a sampled order's context, from the message's headers


def decode_report(body: bytes, delivery_tag: int, now: float) -> Report | None:
    """A status report, or None if the body is not one."""
    try:
        event = event_pb2.Event.FromString(body)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
        return None
    status = ORDER_STATE_OF_EVENT.get(event.event_type)
    if status is None or event.instance_id <= 0:
        return None
    at = dt.datetime.fromtimestamp(event.timestamp or time.time(), dt.UTC)
    return Report(delivery_tag, event.instance_id, status, event.endpoint, event.reason, at,
                  now, event.user_id, event.product_id)


# What an endpoint may be: https, a host of lower-case letters, digits, dots and
# hyphens, an optional port 443, an optional plain path. No userinfo, backslash,
# percent-encoding or anything else a browser's URL parser might read differently.
ENDPOINT = re.compile(r"https://(?P<host>[a-z0-9.-]+)(?::443)?(?:/[A-Za-z0-9._~/-]*)?")


def endpoint_ok(report: Report, domain: str) -> bool:
    """A report may name only an https endpoint on its own instance's host under
    `rd_domain` (or none): a forged or confused report must not hand a buyer
    someone else's address or an attacker's.

    Checked on the text itself rather than on what urlsplit makes of it:
    `https://evil.example\\.<id>.<domain>` has a urlsplit host under our domain,
    while browsers and WHATWG URL parsers read its host as `evil.example`.
    """
    if not report.endpoint:
        return True
    match = ENDPOINT.fullmatch(report.endpoint)
    if match is None:
        return False
    own = f"{report.instance_id}.{domain}".lower()
    host = match["host"]
    return ".." not in host and (host == own or host.endswith("." + own))


def one_per_instance(reports: list[Report]) -> tuple[list[Report], list[Report]]:
    """(the report to apply per instance, the reports it supersedes), from arrival order.

    Only a `PROCESSING` row changes, so if one UPDATE carried two reports for
    an instance, PostgreSQL would apply whichever row of the join it met first.
    We decide instead, as if the reports had arrived one by one in the order
    they happened: the earliest by event timestamp wins (arrival order breaks
    ties), and every later one would have found the row terminal already.
    """
    chosen: dict[int, Report] = {}
    superseded: list[Report] = []
    for report in reports:
        best = chosen.get(report.instance_id)
        if best is None or report.at < best.at:
            chosen[report.instance_id] = report
            if best is not None:
                superseded.append(best)
        else:
            superseded.append(report)
    return list(chosen.values()), superseded


class StatusConsumer:
    """Consumes `QUEUE_STATUS` and applies reports in batches."""

    def __init__(self, settings: Settings, redis: Redis, pool: asyncpg.Pool,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing  # ends a sampled order's trace (engine.tracing)
        self._spans: dict[int, Any] = {}  # instance ID -> its status.update, while applied
        self.redis = redis
        self.pool = pool
        self.keys = Keys(settings.key_prefix)
        self.gate = Gate(redis, self.keys)
        self._held: list[Report] = []  # reports for instances not logged yet
        self.reporter = user_of(settings, RESOURCE_DOMAIN)  # the only user trusted to report
        self.consumer = BatchingConsumer(
            settings, QUEUE_STATUS, component=ENGINE, trusted=self.reporter,
            prefetch=settings.status_batch_size * 2, batch_size=settings.status_batch_size,
            handle=self.handle, untrusted=self.refuse_untrusted, on_reset=self._forget_held,
            name="status consumer")

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set; reconnect with backoff on any outage."""
        await self.consumer.run(stopping)

    async def refuse_untrusted(self, deliveries: list[Delivery]) -> None:
        """Reports from any broker user but the Resource Domain's: dead-lettered unread."""
        for d in deliveries:
            await self._dead_letter(d.tag, "untrusted_sender",
                                    f"sent by broker user {d.user_id or '(none)'}; only "
                                    f"{self.reporter} reports status", sender=d.user_id,
                                    body=d.body)

    def _forget_held(self) -> None:
        """Reports of a lost channel: the broker delivers them again."""
        self._held = []

    async def handle(self, batch: list[Delivery]) -> None:
        """Apply what arrived; acknowledge what is settled."""
        now = time.monotonic()
        reports, garbage = [], []
        for delivery in batch:
            report = decode_report(delivery.body, delivery.tag, now)
            if report is None:
                garbage.append(delivery)
            else:
                if self.tracing is not None and delivery.headers:
                    report.trace = self.tracing.from_headers(delivery.headers)
                reports.append(report)
        reports = self._held + reports  # held ones arrived first
        self._held = []
        for delivery in garbage:
            await self._dead_letter(delivery.tag, "bad_report", "not a status event",
                                    body=delivery.body)
        foreign = [r for r in reports if not endpoint_ok(r, self.settings.rd_domain)]
        for r in foreign:  # never stored, never shown to a buyer
            await self._dead_letter(r.delivery_tag, "foreign_endpoint",
                                    f"endpoint {r.endpoint[:200]!r} is not under "
                                    f"{r.instance_id}.{self.settings.rd_domain}",
                                    instance_id=r.instance_id, endpoint=r.endpoint[:200])
        reports = [r for r in reports if r not in foreign]
        if not reports:
            return
        traced = [r for r in reports if r.trace is not None]
        if not traced:
            await self.apply(reports)
            return
        await self._traced_apply(reports, traced)

    async def _traced_apply(self, reports: list[Report], traced: list[Report]) -> None:
        """`apply`, each sampled order's report a span ending its trace: the update of
        its row and the hand-off of a failed order's unit (a report held for an order
        not logged yet gets its span when it is applied)."""
        assert self.tracing is not None
        spans = [(r, self.tracing.start("status.update", r.trace, kind="consumer",
                                        attributes={"seckill.instance_id": str(r.instance_id),
                                                    "seckill.status": r.status}))
                 for r in traced]
        self._spans = {r.instance_id: span for r, span in spans}
        try:
            await self.apply(reports)
        finally:
            self._spans = {}
            held = {id(r) for r in self._held}
            for report, span in spans:
                if id(report) not in held:
                    span.end()

    async def apply(self, reports: list[Report]) -> None:
        """Apply one report per instance; acknowledge every report of a known instance,
        dead-letter those that name another user or product than its order's.

        `reports` are in arrival order. The reports one batch does not apply
        (`one_per_instance`) are acknowledged with it, after the commit.
        """
        ids = list({r.instance_id: None for r in reports})
        async with self.pool.acquire() as conn:
            orders = {row[0]: (row[1], row[2], row[3]) for row in await conn.fetch(KNOWN, ids)}
        known = [r for r in reports if r.instance_id in orders]
        wrong = [r for r in known if orders[r.instance_id][:2] != (r.user_id, r.product_id)]
        for r in wrong:
            await self._refuse_mismatch(r, *orders[r.instance_id][:2])
        settled = [r for r in known if r not in wrong]
        releases = [r for r in settled if r.status == RELEASED]
        unasked = [r for r in releases if orders[r.instance_id][2] not in (RELEASING, RELEASED)]
        for r in unasked:
            await self._refuse_release(r, orders[r.instance_id][2])
        settled = [r for r in settled if r not in unasked]
        kept, _ = one_per_instance([r for r in settled if r.status != RELEASED])
        kept += list({r.instance_id: r for r in settled if r.status == RELEASED}.values())
        applied, failed = await self._write(kept)
        metrics.STATUS_UPDATES.labels("applied").inc(applied)
        metrics.STATUS_UPDATES.labels("unchanged").inc(max(0, len(settled) - applied))
        if failed:
            await self.compensate(failed)
        await self._ack([r.delivery_tag for r in settled])
        await self._hold_or_drop([r for r in reports if r.instance_id not in orders])

    async def _write(self, kept: list[Report]) -> tuple[int, list[asyncpg.Record]]:
        """Apply one report per instance; (rows changed, failed orders to hand back)."""
        if not kept:
            return 0, []
        ids = [r.instance_id for r in kept]
        states = [r for r in kept if r.status != RELEASED]
        released = [r for r in kept if r.status == RELEASED]
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                APPLY, [r.instance_id for r in states], [r.status for r in states],
                [r.endpoint for r in states], [r.reason for r in states],
                [r.at for r in states])
            gone = await conn.execute(APPLY_RELEASED, [r.instance_id for r in released],
                                      [r.at for r in released])
            failed = await conn.fetch(TO_COMPENSATE, ids)
        return int(status.rsplit(" ", 1)[1]) + int(gone.rsplit(" ", 1)[1]), failed

    async def _refuse_mismatch(self, report: Report, user_id: int, product_id: int) -> None:
        """A report naming an order with another user or product: never applied."""
        await self._dead_letter(
            report.delivery_tag, "report_mismatch",
            f"report for instance {report.instance_id} names user {report.user_id} and "
            f"product {report.product_id}; its order is user {user_id}'s of product "
            f"{product_id}", instance_id=report.instance_id, status=report.status,
            user_id=report.user_id, product_id=report.product_id)

    async def _refuse_release(self, report: Report, status: str) -> None:
        """A RELEASED report for an order nobody asked to release: never applied."""
        await self._dead_letter(
            report.delivery_tag, "release_out_of_order",
            f"RELEASED reported for instance {report.instance_id}, whose order is {status}, "
            "not RELEASING", instance_id=report.instance_id, status=report.status)

    async def compensate(self, rows: list[asyncpg.Record]) -> None:
        """Hand each failed or released order's unit on (the waitlist's head, or back to
        its sale), then mark the order."""
        done = []
        for row in rows:
            span = self._spans.get(row["instance_id"]) if self._spans else None
            if span is None:
                await self._hand_on(row)
            else:  # a sampled order's: its log line and an event in its trace
                assert self.tracing is not None
                with self.tracing.within(span):
                    span.add_event("unit_handed_on", {"seckill.result": await self._hand_on(row)})
            done.append(row["instance_id"])
        async with self.pool.acquire() as conn:
            await conn.execute(MARK_COMPENSATED, done)

    async def _hand_on(self, row: asyncpg.Record) -> str:
        """One failed or released order's unit to the waitlist's head or its sale."""
        if row["sale_id"] is None:
            result = "no_sale"  # an order added by hand took no unit of a sale
        else:
            result = await self.gate.refund(row["product_id"], row["user_id"],
                                            row["sale_id"], row["slot"], row["stream_id"])
        metrics.COMPENSATIONS.labels(result).inc()
        log.info("compensation for instance %d: %s", row["instance_id"], result,
                 extra={"event": "compensation", "result": result,
                        "instance_id": row["instance_id"], "product_id": row["product_id"]})
        return result

    async def _hold_or_drop(self, unknown: list[Report]) -> None:
        """A report can overtake its order's row: retry it for a while, then give up."""
        now = time.monotonic()
        for report in unknown:
            if now - report.first_seen < self.settings.status_unknown_retry:
                self._held.append(report)
            else:
                metrics.STATUS_UPDATES.labels("unknown_instance").inc()
                await self._dead_letter(report.delivery_tag, "unknown_instance",
                                        f"no order has instance ID {report.instance_id}",
                                        instance_id=report.instance_id, status=report.status)

    async def _dead_letter(self, tag: int, reason: str, detail: str, **fields: Any) -> None:
        entry: dict[str, str | bytes] = {"reason": reason, "detail": detail,
                                         "at": str(int(time.time() * 1000))}
        entry.update({k: v if isinstance(v, bytes) else str(v) for k, v in fields.items()})
        await self.redis.xadd(self.keys.status_dlq, entry)  # type: ignore[arg-type]
        await self._ack([tag])
        metrics.STATUS_DEAD_LETTERS.labels(reason).inc()
        log.warning("status report dead-lettered: %s", detail,
                    extra={"event": "status_dead_letter", "reason": reason})

    async def _ack(self, tags: list[int]) -> None:
        await self.consumer.ack(tags)


def encode_report(instance_id: int, status: str, *, endpoint: str = "", reason: str = "",
                  timestamp: int | None = None, **extra: Any) -> bytes:
    """A status event body, as the Resource Domain sends it (also used by tests)."""
    return event_pb2.Event(event_type=EVENT_OF_ORDER_STATE[status], instance_id=instance_id,
                           endpoint=endpoint, reason=reason,
                           timestamp=timestamp or int(time.time()), **extra).SerializeToString()

