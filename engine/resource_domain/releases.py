"""The Resource Domain's side of a release: delete a RUNNING instance, report RELEASED.

The engine publishes INSTANCE_RELEASED (routing key `instance.released`) when an
owner gives an instance back; the Resource Domain consumes it from
`resource.instance-released`, claims the instance in its own table (RUNNING ->
RELEASING, stamped with its owner number, see `claims`), deletes the instance's
Kubernetes objects (`Provisioner.release`), records RELEASED and reports
INSTANCE_RELEASED on `instance.status`. A delivery is acknowledged only once its
report is confirmed.

At least once, like everything on the bus: a redelivered release of a RELEASED
instance reports RELEASED again without deleting anything; a RELEASING claim of a
Resource Domain that died is taken over (its deletion run again: deleting what is
already gone is no error). A release that names another user than the instance's,
an instance this Resource Domain never provisioned, or one that is not running
(FAILED) is kept in `resource_domain.dead_letters` with its reason, never acted on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from engine.amqp.consumer import Delivery
from engine.amqp.publisher import CONFIRMED, ConfirmPublisher, Message
from engine.errors import PublishFailed
from engine.metrics import resource_domain as metrics
from engine.orderstates import RELEASED, RELEASING, RUNNING
from engine.pb import event_pb2
from engine.resource_domain.claims import DEAD_CLAIM, OwnerLock
from engine.resource_domain.provisioning import Provisioner

log = logging.getLogger("seckill.resource_domain")

CLAIM = """
UPDATE resource_domain.instances SET status = 'RELEASING', owner = $2, claimed_at = now()
WHERE instance_id = ANY($1::bigint[]) AND status = 'RUNNING' RETURNING instance_id
"""
# a dead owner's claim, or our own (a release that failed halfway, delivered again)
RECLAIM = f"""
UPDATE resource_domain.instances SET owner = $2, claimed_at = now()
WHERE instance_id = ANY($1::bigint[]) AND status = 'RELEASING'
  AND (owner = $2 OR {DEAD_CLAIM})
RETURNING instance_id
"""
# only where our claim is still the recorded one (see claims: a lost lock connection)
FINISH = """
UPDATE resource_domain.instances SET status = 'RELEASED', released_at = now(),
       finished_at = now()
WHERE instance_id = ANY($1::bigint[]) AND status = 'RELEASING' AND owner = $2
"""
STATE = """
SELECT instance_id, user_id, status FROM resource_domain.instances
WHERE instance_id = ANY($1::bigint[])
"""

# Puts deliveries in resource_domain.dead_letters: (deliveries, reason, details)
DeadLetterer = Callable[[list[Delivery], str, list[str]], Awaitable[None]]
Acker = Callable[[set[int]], Awaitable[None]]


@dataclass(slots=True)
class ReleaseEvent:
    delivery: Delivery
    event: event_pb2.Event


class Releases:
    """Handles the batches of the release queue's consumer (`ResourceDomain` owns it)."""

    def __init__(self, pool: asyncpg.Pool, claims: OwnerLock, provisioner: Provisioner,
                 publisher: ConfirmPublisher, *, ack: Acker, dead_letter: DeadLetterer,
                 publish_timeout: float) -> None:
        self.pool = pool
        self.claims = claims
        self.provisioner = provisioner
        self.publisher = publisher
        self._ack = ack
        self._dead_letter = dead_letter
        self.publish_timeout = publish_timeout
        self._waiting: list[ReleaseEvent] = []  # claimed by a live Resource Domain: later

    def forget_waiting(self) -> None:
        """Deliveries of a lost channel: the broker delivers them again."""
        self._waiting = []

    async def flush(self, arrived: list[Delivery]) -> None:
        """Release what arrived and what was put back to wait."""
        batch, self._waiting = self._waiting, []
        garbage = []
        for delivery in arrived:
            event = _decode(delivery.body)
            if event is None:
                garbage.append(delivery)
            else:
                batch.append(ReleaseEvent(delivery, event))
        if garbage:
            await self._dead_letter(garbage, "bad_release",
                                    ["not an INSTANCE_RELEASED event"] * len(garbage))
        if batch:
            await self.handle(batch)

    async def handle(self, batch: list[ReleaseEvent]) -> None:
        ids = list({r.event.instance_id: None for r in batch})
        owner = await self.claims.owner()
        async with self.pool.acquire() as conn:
            rows = {r["instance_id"]: r for r in await conn.fetch(STATE, ids)}
        refused = await self._refuse(batch, rows)
        batch = [r for r in batch if r not in refused]
        ids = [i for i in ids if i in rows and rows[i]["user_id"] in _users(batch, i)]
        async with self.pool.acquire() as conn:
            mine = {r[0] for r in await conn.fetch(CLAIM, ids, owner)}
            mine |= {r[0] for r in await conn.fetch(RECLAIM, ids, owner)}
        events = {r.event.instance_id: r.event for r in batch}
        await asyncio.gather(*(self.provisioner.release(events[i]) for i in mine))
        if mine:
            async with self.pool.acquire() as conn:
                await conn.execute(FINISH, list(mine), owner)
            metrics.RELEASED.inc(len(mine))
        async with self.pool.acquire() as conn:
            done = {r["instance_id"] for r in await conn.fetch(STATE, ids)
                    if r["status"] == RELEASED}
        await self.report([r for r in batch if r.event.instance_id in done])
        self._waiting += [r for r in batch if r.event.instance_id not in done]

    async def _refuse(self, batch: list[ReleaseEvent],
                      rows: dict[int, asyncpg.Record]) -> list[ReleaseEvent]:
        """Dead-letter releases of unknown or failed instances and of another user's."""
        refused: dict[str, list[tuple[ReleaseEvent, str]]] = {}
        for r in batch:
            row = rows.get(r.event.instance_id)
            if row is None:
                why = ("unknown_instance", f"instance {r.event.instance_id} was never "
                       "provisioned here")
            elif row["user_id"] != r.event.user_id:
                why = ("release_mismatch", f"release of instance {r.event.instance_id} names "
                       f"user {r.event.user_id}; it is user {row['user_id']}'s")
            elif row["status"] not in (RUNNING, RELEASING, RELEASED, "PROVISIONING"):
                why = ("not_running", f"instance {r.event.instance_id} is {row['status']}")
            else:
                continue
            refused.setdefault(why[0], []).append((r, why[1]))
        for reason, items in refused.items():
            await self._dead_letter([r.delivery for r, _ in items], reason,
                                    [detail for _, detail in items])
        return [r for items in refused.values() for r, _ in items]

    async def report(self, ready: list[ReleaseEvent]) -> None:
        """INSTANCE_RELEASED for each; acknowledge a delivery once its report is confirmed."""
        if not ready:
            return
        results = await self.publisher.publish([_released(r.event) for r in ready],
                                               self.publish_timeout)
        await self._ack({r.delivery.tag for r, res in zip(ready, results, strict=True)
                         if res == CONFIRMED})
        if any(res != CONFIRMED for res in results):
            raise PublishFailed("release reports not confirmed")


def _users(batch: list[ReleaseEvent], instance_id: int) -> set[int]:
    return {r.event.user_id for r in batch if r.event.instance_id == instance_id}


def _decode(body: bytes) -> event_pb2.Event | None:
    try:
        event = event_pb2.Event.FromString(body)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
        return None
    if event.event_type != event_pb2.INSTANCE_RELEASED or event.instance_id <= 0:
        return None
    return event


def _released(event: event_pb2.Event) -> Message:
    body = event_pb2.Event(
        event_type=event_pb2.INSTANCE_RELEASED, instance_id=event.instance_id,
        user_id=event.user_id, name=event.name, spec=event.spec, timestamp=int(time.time()),
        product_id=event.product_id, stream_id=event.stream_id, sale_id=event.sale_id,
        slot=event.slot).SerializeToString()
    return Message(body, str(event.instance_id), "INSTANCE_RELEASED")
