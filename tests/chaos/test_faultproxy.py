"""The fault proxy, seen by the real clients of Redis, RabbitMQ and PostgreSQL.

Each fault is checked by what the client sees (an error, its own timeout, a slower
round trip), and `heal` must bring the same client back. Durations are only ever
lower bounds: the machine is shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiormq
import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

from engine.connections import PG_ERRORS
from engine.testing.faultproxy import ControlError, FaultProxy, ProxyProcess, upstream_of, via

pytestmark = pytest.mark.timeout(120)

LATENCY = 0.2
SLACK = 0.005  # asyncio may run a timer up to its clock resolution early


@pytest.fixture
async def redis_proxy(settings) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream_of(settings.redis_url, 6379)) as proxy:
        yield proxy


def _redis_via(settings, proxy: FaultProxy) -> Redis:
    # no retries: the test is about what one connection sees
    return Redis.from_url(via(settings.redis_url, proxy.port), socket_timeout=0.5,
                          socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


async def _elapsed(call) -> float:
    started = time.monotonic()
    await call()
    return time.monotonic() - started


async def test_redis_cut_blackhole_latency_bandwidth_heal(settings, redis_proxy, keys):
    client = _redis_via(settings, redis_proxy)
    try:
        assert await client.ping()
        assert redis_proxy.cut() == 1
        with pytest.raises(RedisConnectionError):
            await client.ping()
        assert await client.ping()  # a cut is instant: a new connection goes through

        redis_proxy.blackhole()
        with pytest.raises(RedisTimeout):
            await client.ping()
        redis_proxy.heal()
        assert await client.ping()

        redis_proxy.set_latency(LATENCY)
        assert await _elapsed(client.ping) >= 2 * LATENCY - SLACK  # there and back
        redis_proxy.heal()

        value = b"x" * 100_000
        await client.set(keys.stock(1), value)
        redis_proxy.set_bandwidth(100_000)
        fetch = Redis.from_url(via(settings.redis_url, redis_proxy.port), socket_timeout=10)
        try:
            assert await _elapsed(lambda: fetch.get(keys.stock(1))) >= 0.9 - SLACK
        finally:
            await fetch.aclose()
        redis_proxy.heal()
        assert await client.get(keys.stock(1)) == value
    finally:
        await client.aclose()


async def test_a_cut_is_a_reset_not_a_close(settings, redis_proxy):
    """A dead link: the peer's next read fails with ECONNRESET, it does not see a clean EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", redis_proxy.port)
    try:
        writer.write(b"PING\r\n")
        assert await reader.readline() == b"+PONG\r\n"
        redis_proxy.cut()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
    finally:
        writer.close()


async def test_postgres_cut_blackhole_latency_heal(settings):
    async with FaultProxy(upstream_of(settings.pg_dsn, 5432)) as proxy:
        dsn = via(settings.pg_dsn, proxy.port)
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            proxy.cut()
            with pytest.raises(PG_ERRORS):
                await conn.fetchval("SELECT 1")
        finally:
            conn.terminate()

        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            proxy.blackhole()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT 1", timeout=0.5)
            with pytest.raises(TimeoutError):
                await asyncpg.connect(dsn, timeout=0.5)
            proxy.heal()
            assert await conn.fetchval("SELECT 2", timeout=5) == 2

            proxy.set_latency(LATENCY)
            assert await _elapsed(lambda: conn.fetchval("SELECT 1")) >= 2 * LATENCY - SLACK
            proxy.heal()
        finally:
            conn.terminate()


async def test_rabbitmq_cut_blackhole_latency_heal(settings):
    async with FaultProxy(upstream_of(settings.amqp_url, 5672)) as proxy:
        url = via(settings.amqp_url, proxy.port)
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            proxy.cut()
            with pytest.raises((aiormq.exceptions.AMQPError, ConnectionError)):
                await channel.queue_declare(exclusive=True, timeout=5)
        finally:
            await _close_quietly(conn)

        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            proxy.blackhole()
            with pytest.raises(TimeoutError):
                await channel.queue_declare(exclusive=True, timeout=0.5)
            proxy.heal()
            channel = await conn.channel(timeout=5)
            await channel.queue_declare(exclusive=True, timeout=5)

            proxy.set_latency(LATENCY)
            declared = await _elapsed(lambda: channel.queue_declare(exclusive=True, timeout=5))
            assert declared >= 2 * LATENCY - SLACK
            proxy.heal()
        finally:
            await _close_quietly(conn)


async def _close_quietly(conn) -> None:
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:  # noqa: BLE001 - a cut connection may fail to close any way
        pass


async def test_a_proxy_in_another_process_is_driven_through_its_control_port(settings):
    proxy = await asyncio.to_thread(ProxyProcess, upstream_of(settings.redis_url, 6379))
    client = Redis.from_url(via(settings.redis_url, proxy.port), socket_timeout=2,
                            retry=Retry(NoBackoff(), 0))
    try:
        assert await client.ping()
        answer = await asyncio.to_thread(proxy, "cut")
        assert answer["cut"] == 1
        with pytest.raises(RedisConnectionError):
            await client.ping()
        assert (await asyncio.to_thread(proxy, "blackhole"))["blackholed"] is True
        with pytest.raises(RedisTimeout):
            await client.ping()
        await asyncio.to_thread(proxy, "heal")
        assert await client.ping()
        assert (await asyncio.to_thread(proxy, "latency 0.25"))["latency"] == 0.25
        assert await _elapsed(client.ping) >= 0.5 - SLACK
        with pytest.raises(ControlError, match="unknown command"):
            await asyncio.to_thread(proxy, "explode")
    finally:
        await client.aclose()
        proxy.stop()
