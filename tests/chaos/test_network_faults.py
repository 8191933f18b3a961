"""The engine behind a fault proxy, one dependency at a time: a cut and a blackhole of a
few seconds are ridden out with nothing lost, nothing doubled and no worker exiting."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from support import (
    add_products,
    all_done,
    announce,
    established_tcp,
    log_rows,
    push_orders,
    rows_at_least,
)

from engine.connections import connect_redis
from engine.testing.faultproxy import FaultProxy, ProxyProcess, upstream_of, via
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap, collect_orders
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

BLACKHOLE_S = 4.0
PER_STEP = 3000
# Every wait on a service is shorter than the blackhole, so each one fires and is retried;
# claim_idle_ms lets the janitor take back what a read whose reply was lost left pending.
QUICK = {"batch_size": 100, "publish_timeout": 2, "db_timeout": 2, "redis_timeout": 1,
         "connect_timeout": 2, "retry_backoff_max": 1, "claim_idle_ms": 5000}
SERVICES = {"redis": ("redis_url", 6379), "rabbitmq": ("amqp_url", 5672),
            "postgresql": ("pg_dsn", 5432)}


@pytest.mark.parametrize("service", list(SERVICES))
async def test_the_engine_rides_out_a_cut_and_a_blackhole(settings, redis, keys, product_id,
                                                          service):
    setting, default_port = SERVICES[service]
    url = getattr(settings, setting)
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    proxy = await asyncio.to_thread(ProxyProcess, upstream_of(url, default_port))
    engine: EngineProcess | None = None
    try:
        async with EventTap(settings.amqp_url) as tap:
            engine = EngineProcess(settings, workers=2, **QUICK,
                                   **{setting: via(url, proxy.port)})
            await _orders(redis, keys, product_id, 1)
            await wait_for(lambda: rows_at_least(settings, [product_id], 500), 60, "progress")

            assert (await asyncio.to_thread(proxy, "cut"))["cut"] > 0
            await _orders(redis, keys, product_id, 2)
            await wait_for(lambda: rows_at_least(settings, [product_id], PER_STEP + 500), 90,
                           "progress after the cut")

            await asyncio.to_thread(proxy, "blackhole")
            await _orders(redis, keys, product_id, 3)
            await asyncio.sleep(BLACKHOLE_S)  # the scenario: the blackhole lasts this long
            await asyncio.to_thread(proxy, "heal")
            await wait_for(lambda: all_done(settings, redis, keys, [product_id], 3 * PER_STEP),
                           120, "every order after the blackhole")
            events = await collect_orders(tap, 3 * PER_STEP)
    finally:
        if engine is not None:
            engine.stop()
        proxy.stop()
    assert_one_id_per_order(await log_rows(settings, [product_id]), events, 3 * PER_STEP)
    output = engine.output()
    assert "respawning in" not in output, output  # no worker died, none was respawned


async def _orders(redis, keys, product_id: int, step: int) -> None:
    first = (step - 1) * PER_STEP + 1
    await push_orders(redis, keys, product_id, range(first, first + PER_STEP), first_slot=first)


def test_a_command_on_a_reset_redis_connection_is_a_connection_error(settings):
    """Under uvloop (the workers' loop) too: not a RuntimeError the worker takes for a bug."""

    async def main() -> None:
        async with FaultProxy(upstream_of(settings.redis_url, 6379)) as proxy:
            client = await connect_redis(settings.replace(
                redis_url=via(settings.redis_url, proxy.port)), retry=Retry(NoBackoff(), 0))
            try:
                proxy.cut()

                async def reset() -> bool:  # no connection of the client to the proxy left
                    return all(remote != proxy.port for _, remote, *_ in established_tcp())

                # the RST is in before the next command is written
                await wait_for(reset, 5, "the client's connection reset", interval=0.01)
                with pytest.raises(RedisConnectionError):
                    await client.ping()
            finally:
                await client.aclose()

    uvloop.run(main())
