"""Fixtures for tests against a Redis Cluster: one of the session's own, started here.

`redis_cluster` forms a 3-master Redis Cluster with one replica each on free ports
(engine.testing.clusters, under engine.testing.nodes.BASE, so a killed session's servers are
reaped by the next), once per session and only when a test asks. Without redis-server
the tests skip with the exact command that installs it. `rabbit_cluster` does the same
for three RabbitMQ nodes joined into one cluster, its topology declared.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from engine.config import Settings
from engine.connections import connect_redis
from engine.testing.clusters import LocalRabbitCluster, LocalRedisCluster
from engine.testing.nodes import LocalNodeFailed, rabbit_bin

INSTALL = "apt-get install -y redis-server redis-tools"
RABBIT_INSTALL = "apt-get install -y rabbitmq-server"


@pytest.fixture(scope="session")
def redis_cluster(_reaped: None) -> Iterator[LocalRedisCluster]:
    missing = [exe for exe in ("redis-server", "redis-cli") if shutil.which(exe) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found; run: {INSTALL}")
    cluster = LocalRedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster: LocalRedisCluster) -> Settings:
    """The test's settings with `redis_url` naming the session's Redis Cluster."""
    return settings.replace(redis_url=redis_cluster.url)


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    """An asyncio RedisCluster client (typed as Redis: the same commands)."""
    client = await connect_redis(cluster_settings)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def rabbit_cluster(_reaped: None, base_settings: Settings,
                   broker_users: dict[str, str]) -> Iterator[LocalRabbitCluster]:
    """Three RabbitMQ nodes in one cluster (about 120 MB and a few seconds each), with
    the session's broker users."""
    from engine.admin.brokerusers import ensure_broker_users
    from engine.admin.migrate import declare_topology

    try:
        rabbit_bin()
    except LocalNodeFailed:
        pytest.skip(f"RabbitMQ not installed; run: {RABBIT_INSTALL}")
    cluster = LocalRabbitCluster()
    try:
        cluster.start()
        asyncio.run(declare_topology(cluster.url, timeout=60))
        node = cluster.nodes[0]
        ensure_broker_users(base_settings.replace(amqp_url=cluster.url, **broker_users),
                            command=[str(rabbit_bin() / "rabbitmqctl"), "-n", node.nodename],
                            env=node.env())
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def rabbit_cluster_settings(settings: Settings, rabbit_cluster: LocalRabbitCluster) -> Settings:
    """The test's settings with `amqp_url` listing every node of the session's cluster,
    each node running again whatever the last test stopped."""
    for node in rabbit_cluster.nodes:
        if not node.answers():
            node.start_app()
    return settings.replace(amqp_url=rabbit_cluster.url)
