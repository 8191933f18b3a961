"""Fixtures for tests that stop, restart or pause a service: instances of the suite's own.

The shared Redis, RabbitMQ and PostgreSQL may serve a demo or another run at the
same time, so no test stops, restarts or pauses them. A test that needs to asks
for `private_redis`, `private_rabbitmq` or `private_postgres` (or settings
pointing at them): a server started on a port and in a directory of its own
(engine.testing.nodes), once per session and only when the first test
asks. Each test gets it running and answering, whatever the previous test did
to it (stopped, killed, frozen, its broker app stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from support import purge_queues

from engine.amqp.topology import QUEUE_CREATED, QUEUE_STATUS
from engine.config import Settings
from engine.testing.nodes import (
    LocalNode,
    PostgresNode,
    RabbitNode,
    RedisNode,
    destroy_all,
    rabbit_bin,
    reap_orphans,
)

PRIVATE_DATABASE = "seckill_test"


@pytest.fixture(scope="session")
def _reaped() -> Iterator[None]:
    """Servers of an earlier session that was killed outright go first; ours go last."""
    reap_orphans()
    yield
    destroy_all()


N = TypeVar("N", bound=LocalNode)


def _session_node(node: N, prepare: Callable[[N], object] = lambda node: None) -> Iterator[N]:
    try:
        node.start()
        prepare(node)
        yield node
    finally:
        node.destroy()


@pytest.fixture(scope="session")
def _private_redis_node(_reaped: None) -> Iterator[RedisNode]:
    yield from _session_node(RedisNode())


@pytest.fixture(scope="session")
def _private_rabbitmq_node(_reaped: None, base_settings: Settings,
                           broker_users: dict[str, str]) -> Iterator[RabbitNode]:
    from engine.admin.brokerusers import ensure_broker_users

    def users(node: RabbitNode) -> None:  # the session's broker users, as on the shared one
        ensure_broker_users(base_settings.replace(amqp_url=node.url, **broker_users),
                            command=[str(rabbit_bin() / "rabbitmqctl"), "-n", node.nodename],
                            env=node.env())

    yield from _session_node(RabbitNode(), users)


@pytest.fixture(scope="session")
def _private_postgres_node(_reaped: None) -> Iterator[PostgresNode]:
    from engine.admin.migrate import apply_migrations

    # dbmate creates the database
    yield from _session_node(PostgresNode(database=PRIVATE_DATABASE),
                             lambda node: apply_migrations(node.url))


def _ready(node: LocalNode) -> None:
    """Running and answering again after whatever the last test did to it."""
    if node.running():
        node.thaw()  # a test that froze it and failed before thawing
        if isinstance(node, RabbitNode) and not node.answers():
            node.start_app()
    node.start()


@pytest.fixture
def private_redis(_private_redis_node: RedisNode) -> RedisNode:
    """This session's own Redis, running and answering; the test may stop, restart,
    kill, freeze (SIGSTOP) or CLIENT PAUSE it. Keys of other tests may be there
    (each test has its own prefix); after a restart without persistence, none are."""
    _ready(_private_redis_node)
    return _private_redis_node


@pytest.fixture
def private_rabbitmq(_private_rabbitmq_node: RabbitNode) -> RabbitNode:
    """This session's own RabbitMQ node: topology declared (again: a test may have
    deleted a queue), the two queues of the flow empty. `url` is its AMQP URL."""
    from engine.admin.migrate import declare_topology

    node = _private_rabbitmq_node
    _ready(node)
    asyncio.run(declare_topology(node.url))
    asyncio.run(purge_queues(node.url, QUEUE_CREATED, QUEUE_STATUS))
    return node


@pytest.fixture
def private_postgres(_private_postgres_node: PostgresNode) -> PostgresNode:
    """This session's own PostgreSQL cluster; `url` is its migrated database."""
    _ready(_private_postgres_node)
    return _private_postgres_node


@pytest.fixture
def private_redis_settings(settings: Settings, private_redis: RedisNode) -> Settings:
    """The test's settings with Redis swapped for the private one."""
    return settings.replace(redis_url=private_redis.url)


@pytest.fixture
def private_rabbitmq_settings(settings: Settings, private_rabbitmq: RabbitNode) -> Settings:
    """The test's settings with RabbitMQ swapped for the private node."""
    return settings.replace(amqp_url=private_rabbitmq.url)


@pytest.fixture
def private_settings(settings: Settings, private_redis: RedisNode,
                     private_rabbitmq: RabbitNode, private_postgres: PostgresNode) -> Settings:
    """The test's settings (its key prefix) with all three services private."""
    return settings.replace(redis_url=private_redis.url, amqp_url=private_rabbitmq.url,
                            pg_dsn=private_postgres.url)


@pytest.fixture
async def private_redis_client(private_redis: RedisNode) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis.url)
    yield client
    await client.aclose()
