"""The load test's verifier catches each invariant it claims, broken on purpose.

Each test sells a few units through the real gate; where the invariant is about
rows or events, `seckill run` logs and publishes them first (a tap queue bound
before the run). The verifier must pass on that, and report the one thing the
test then breaks in Redis, PostgreSQL or RabbitMQ.

The database refuses a second row for an order and a shared instance ID by
itself (unique indexes), so those two are broken in a database of the test's
own that lacks the indexes: what the verifier would face if a migration had
not been applied.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiormq
import asyncpg
import pytest
from redis.asyncio import Redis
from support import add_products, all_done

from engine.admin.migrate import apply_migrations
from engine.amqp.topology import EXCHANGE, RK_CREATED
from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.pb import event_pb2
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for
from loadtest.run import declare_tap
from loadtest.verify import tried_key, verify

pytestmark = pytest.mark.timeout(240)

STOCK = 6
BUYERS = [11, 12, 13, 14]  # four of six units sold: the sale stays open


@dataclass
class Rehearsal:
    """A small sale as the verifier sees it after a rehearsal."""

    settings: Settings
    pid: int
    sale: str
    tap: str | None = None

    async def problems(self, engine: bool = True) -> list[str]:
        return await verify(self.settings, self.pid, self.sale, STOCK, engine=engine,
                            tap=self.tap)


async def sell(settings: Settings, redis: Redis, pid: int) -> str:
    """Open a sale of STOCK and let every buyer of BUYERS through the gate once."""
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    sale = await gate.open_sale(pid, STOCK)
    for uid in BUYERS:
        await redis.sadd(tried_key(keys, pid), uid)
        assert (await gate.buy(pid, uid)).outcome == "accepted"
    return sale


async def rehearse(settings: Settings, redis: Redis, pid: int) -> Rehearsal:
    """Sell, then let `seckill run` log and publish every order, with a tap bound first."""
    await add_products(settings, [pid])
    tap = await declare_tap(settings)
    sale = await sell(settings, redis, pid)
    engine = EngineProcess(settings, workers=1)
    try:
        keys = Keys(settings.key_prefix)
        await wait_for(lambda: all_done(settings, redis, keys, [pid], len(BUYERS)), 120,
                       "every order logged and acknowledged")
    finally:
        engine.stop()
    rehearsal = Rehearsal(settings, pid, sale, tap)
    assert await rehearsal.problems() == [], "the verifier fails an intact rehearsal"
    return rehearsal


async def sql(settings: Settings, query: str, *args: object) -> str:
    conn = await asyncpg.connect(settings.pg_dsn, timeout=30)
    try:
        return await conn.execute(query, *args, timeout=30)
    finally:
        await conn.close()


# -- what each test breaks ----------------------------------------------------------


async def delete_a_row(r: Rehearsal) -> None:
    assert await sql(r.settings, "DELETE FROM seckill_logs WHERE id = (SELECT min(id) "
                     "FROM seckill_logs WHERE product_id = $1)", r.pid) == "DELETE 1"


async def add_a_row_for_no_order(r: Rehearsal) -> None:
    assert await sql(r.settings, "INSERT INTO seckill_logs (product_id, user_id, instance_id,"
                     " stream_id, sale_id) VALUES ($1, 99, $2, '1-1', $3)",
                     r.pid, random.randrange(2**40, 2**62), r.sale) == "INSERT 0 1"


async def add_a_second_row_for_an_order(r: Rehearsal) -> None:
    """The same order logged again under a new instance ID (slot left NULL: the slot's
    own unique index would refuse it, and that one is not what is tested)."""
    assert await sql(r.settings, "INSERT INTO seckill_logs (product_id, user_id, instance_id,"
                     " stream_id, sale_id) SELECT product_id, user_id, $2, stream_id, sale_id"
                     " FROM seckill_logs WHERE product_id = $1 ORDER BY id LIMIT 1",
                     r.pid, random.randrange(2**40, 2**62)) == "INSERT 0 1"


async def give_two_orders_one_instance_id(r: Rehearsal) -> None:
    assert await sql(r.settings, "UPDATE seckill_logs SET instance_id = (SELECT min("
                     "instance_id) FROM seckill_logs WHERE product_id = $1) WHERE id = ("
                     "SELECT max(id) FROM seckill_logs WHERE product_id = $1)",
                     r.pid) == "UPDATE 1"


async def take_an_event_off_the_tap(r: Rehearsal) -> None:
    assert r.tap is not None
    conn = await asyncio.wait_for(aiormq.connect(r.settings.amqp_url), 30)
    try:
        channel = await conn.channel()
        message = await channel.basic_get(r.tap, no_ack=True, timeout=30)
        assert message.delivery_tag is not None, "the tap was empty"
    finally:
        await conn.close()


async def publish_an_event_for_no_order(r: Rehearsal) -> None:
    """An INSTANCE_CREATED for the product that no row stands for, confirmed by the broker."""
    event = event_pb2.Event(
        event_type=event_pb2.INSTANCE_CREATED, instance_id=random.randrange(2**40, 2**62),
        user_id=99, name="GPU instance", timestamp=int(time.time()), product_id=r.pid,
        stream_id="1-1", sale_id=r.sale)
    conn = await asyncio.wait_for(aiormq.connect(r.settings.amqp_url), 30)
    try:
        channel = await conn.channel()
        await channel.basic_publish(
            event.SerializeToString(), exchange=EXCHANGE, routing_key=RK_CREATED,
            mandatory=True, timeout=30,
            properties=aiormq.spec.Basic.Properties(
                delivery_mode=2, content_type="application/x-protobuf",
                message_type="INSTANCE_CREATED", message_id=str(event.instance_id)))
    finally:
        await conn.close()


Breakage = Callable[[Rehearsal], Awaitable[None]]


def case(breakage: Breakage, caught: str) -> Any:
    """A test case named after what it breaks."""
    return pytest.param(breakage, caught, id=breakage.__name__)


GUARDED = [
    case(delete_a_row, "1 accepted orders have no row, 0 rows match no accepted order"),
    case(add_a_row_for_no_order, "0 accepted orders have no row, 1 rows match no accepted order"),
    case(take_an_event_off_the_tap, "1 logged orders' events never reached the exchange"),
    case(publish_an_event_for_no_order, "1 events match no logged order, e.g. instance "),
]
UNGUARDED = [
    case(add_a_second_row_for_an_order, "an order has more than one row"),
    case(give_two_orders_one_instance_id, "two orders share an instance ID"),
]


@pytest.fixture(scope="module")
def unguarded_dsn(base_settings: Settings) -> Iterator[str]:
    """A migrated database of this module's own without the unique indexes on
    (product_id, stream_id) and instance_id."""
    name = f"seckill_unguarded_{uuid.uuid4().hex[:10]}"
    dsn = urlunsplit(urlsplit(base_settings.pg_dsn)._replace(path="/" + name))
    apply_migrations(dsn)
    dropped = asyncio.run(sql(base_settings.replace(pg_dsn=dsn),
                              "DROP INDEX seckill_logs_order_key, "
                              "seckill_logs_instance_id_key"))
    assert dropped == "DROP INDEX"
    yield dsn
    asyncio.run(sql(base_settings, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.parametrize(("breakage", "caught"), GUARDED)
async def test_the_verifier_catches(settings, redis, product_id, breakage, caught):
    rehearsal = await rehearse(settings, redis, product_id)
    await breakage(rehearsal)
    problems = await rehearsal.problems()
    assert any(caught in p for p in problems), problems


@pytest.mark.parametrize(("breakage", "caught"), UNGUARDED)
async def test_the_verifier_catches_without_the_unique_indexes(settings, redis, product_id,
                                                               unguarded_dsn, breakage, caught):
    rehearsal = await rehearse(settings.replace(pg_dsn=unguarded_dsn), redis, product_id)
    await breakage(rehearsal)
    problems = await rehearsal.problems()
    assert any(caught in p for p in problems), problems


async def test_the_verifier_catches_a_user_accepted_twice(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    sale = await sell(settings, redis, product_id)
    assert await verify(settings, product_id, sale, STOCK) == []
    # a second order of buyer 11 on a unit nobody took, stock counted down: what a gate
    # that forgot its buyers set would write
    await redis.xadd(keys.stream(product_id), {"uid": str(BUYERS[0]), "ts": "1",
                                               "sale": sale, "slot": str(STOCK)})
    await redis.decr(keys.stock(product_id))
    problems = await verify(settings, product_id, sale, STOCK)
    assert any(f"1 users accepted more than once, e.g. [{BUYERS[0]}]" in p
               for p in problems), problems


async def test_the_verifier_catches_negative_stock(settings, redis, product_id):
    keys = Keys(settings.key_prefix)
    sale = await sell(settings, redis, product_id)
    assert await verify(settings, product_id, sale, STOCK) == []
    await redis.set(keys.stock(product_id), -1)
    problems = await verify(settings, product_id, sale, STOCK)
    assert "stock is negative: -1" in problems, problems


async def test_the_verifier_follows_units_through_the_waitlist(settings, redis, product_id):
    """Units that went back and on to waiting users pass; a unit handed twice does not."""
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    sale = await gate.open_sale(product_id, 2)
    bought = [await gate.buy(product_id, uid) for uid in (11, 12)]
    for uid in (20, 21, 22):
        assert (await gate.join_waitlist(product_id, uid)).outcome == "joined"
    for uid, order in zip((11, 12), bought, strict=True):
        await redis.sadd(tried_key(keys, product_id), uid)
        assert await gate.refund(product_id, uid, sale, order.slot, order.stream_id) == "handed"
    assert await verify(settings, product_id, sale, 2) == []
    # the first unit handed once more, to the user still waiting: what a refund script
    # that forgot its refunded set would do
    await redis.xadd(keys.stream(product_id), {"uid": "22", "ts": "1", "sale": sale,
                                               "slot": str(bought[0].slot),
                                               "from": "waitlist", "turn": "3"})
    await redis.zrem(keys.waitlist(product_id), "22")
    problems = await verify(settings, product_id, sale, 2)
    assert any("units: 0 in stock + 3 held by orders != stock 2" in p for p in problems)
    assert any("units taken again while their order held them" in p for p in problems)
