"""Fixtures that give each test run its own corner of the real services.

- PostgreSQL: a database of its own per test session, migrated, dropped at the end.
- RabbitMQ: a vhost of its own per test session, deleted at the end.
- Redis: a key prefix of its own per test, its keys deleted after the test.

So the suite can run while a demo runs against the defaults.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from support import purge_queues

from engine.amqp.topology import QUEUE_CREATED, QUEUE_RELEASED, QUEUE_STATUS
from engine.config import Settings, load_settings
from engine.keys import Keys

RUN_ID = f"{os.getpid()}{uuid.uuid4().hex[:6]}"
# private_redis, private_rabbitmq, private_postgres: for tests that stop, restart or pause one;
# redis_cluster, cluster_settings, cluster_redis: for tests against a Redis Cluster
pytest_plugins = ["private_services", "cluster_services"]


def _base() -> Settings:
    # Only the connection settings come from the environment; everything else is the
    # tests' business.
    return load_settings(env={k: v for k, v in os.environ.items()
                              if k in ("SECKILL_REDIS_URL", "SECKILL_AMQP_URL",
                                       "SECKILL_PG_DSN")})


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


async def _pg_admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return _base()


@pytest.fixture(scope="session")
def test_db(base_settings: Settings) -> Iterator[str]:
    """DSN of a freshly migrated database owned by this test session."""
    from engine.admin.migrate import apply_migrations

    name = f"seckill_test_{RUN_ID}"
    dsn = _with_path(base_settings.pg_dsn, "/" + name)
    apply_migrations(dsn)  # creates the database
    yield dsn
    asyncio.run(_pg_admin(base_settings.pg_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def test_vhost(base_settings: Settings) -> Iterator[str]:
    """AMQP URL of a vhost owned by this test session, topology declared."""
    from engine.admin.migrate import declare_topology

    vhost = f"seckill-test-{RUN_ID}"
    _rabbitmqctl("add_vhost", vhost)
    user = urlsplit(base_settings.amqp_url).username or "guest"
    _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    url = _with_path(base_settings.amqp_url, "/" + quote(vhost, safe=""))
    asyncio.run(declare_topology(url))
    yield url
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def broker_users(base_settings: Settings, test_vhost: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """This session's own engine and Resource Domain broker users on its vhost (as
    `seckill migrate` makes them), their passwords in a directory of its own."""
    from engine.admin.brokerusers import delete_broker_users, ensure_broker_users

    users = {"amqp_engine_user": f"seckill_engine_{RUN_ID}",
             "amqp_rd_user": f"seckill_resource_domain_{RUN_ID}",
             "amqp_secrets_dir": str(tmp_path_factory.mktemp("amqp-secrets"))}
    s = base_settings.replace(amqp_url=test_vhost, **users)
    ensure_broker_users(s)
    yield users
    delete_broker_users(s)


@pytest.fixture
def settings(base_settings: Settings, test_db: str, test_vhost: str,
             broker_users: dict[str, str]) -> Iterator[Settings]:
    """Settings pointing at this session's database, vhost and broker users and a fresh
    key prefix."""
    prefix = f"test:{RUN_ID}:{uuid.uuid4().hex[:8]}:"
    s = base_settings.replace(pg_dsn=test_db, amqp_url=test_vhost, key_prefix=prefix,
                              **broker_users,
                              metrics_port=0, log_json=False)
    yield s
    asyncio.run(_delete_prefix(s.redis_url, prefix))


async def _delete_prefix(url: str, prefix: str) -> None:
    r = Redis.from_url(url)
    try:
        batch = []
        async for key in r.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await r.delete(*batch)
                batch.clear()
        if batch:
            await r.delete(*batch)
    finally:
        await r.aclose()


@pytest.fixture
def product_id() -> int:
    """A product ID no other test uses (rows in the shared test database stay apart)."""
    return random.randrange(10**9, 9 * 10**9)


@pytest.fixture
def product_ids() -> list[int]:
    return random.sample(range(10**9, 9 * 10**9), 8)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this session's database, as the migrations' owner."""
    c = await asyncpg.connect(settings.pg_dsn)
    yield c
    await c.close()


@pytest.fixture
async def fresh_queues(settings: Settings) -> None:
    """Events other tests' engines published (nobody consumed them) would reach a test's
    Resource Domain first, and reports for them its status consumers: purge both."""
    await purge_queues(settings.amqp_url, QUEUE_CREATED, QUEUE_RELEASED, QUEUE_STATUS)
