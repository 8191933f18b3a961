"""Fixtures for tests against a Redis Cluster: one of the session's own, started here.

`redis_cluster` forms a 3-master Redis Cluster with one replica each on free ports
(engine.admin.localclusters, under localnodes.BASE, so a killed session's servers are
reaped by the next), once per session and only when a test asks. Without redis-server
the tests skip with the exact command that installs it.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from engine.admin.localclusters import LocalRedisCluster
from engine.config import Settings
from engine.connections import connect_redis

INSTALL = "apt-get install -y redis-server redis-tools"


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
