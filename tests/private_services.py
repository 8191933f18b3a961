"""Fixtures for tests that stop, restart or pause a service: instances of the suite's own.

The shared Redis, RabbitMQ and PostgreSQL may serve a demo or another run at the
same time, so no test stops, restarts or pauses them. A test that needs to asks
for `private_redis` (and the like): a server started on a port and in a
directory of its own (engine.admin.localnodes), once per session and only
when the first test asks. Each test gets it running and answering, whatever
the previous test did to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.admin.localnodes import RedisNode, reap_orphans
from engine.config import Settings


@pytest.fixture(scope="session")
def _private_redis_node() -> Iterator[RedisNode]:
    reap_orphans()  # servers of a session that was killed outright
    node = RedisNode()
    try:
        yield node.start()
    finally:
        node.destroy()


@pytest.fixture
def private_redis(_private_redis_node: RedisNode) -> RedisNode:
    """This session's own Redis, running and answering; the test may stop, restart,
    kill, freeze (SIGSTOP) or CLIENT PAUSE it. Keys of other tests may be there
    (each test has its own prefix); after a restart without persistence, none are."""
    node = _private_redis_node
    if node.running():
        node.thaw()  # a test that froze it and failed before thawing
    return node.start()


@pytest.fixture
def private_redis_settings(settings: Settings, private_redis: RedisNode) -> Settings:
    """The test's settings with Redis swapped for the private one."""
    return settings.replace(redis_url=private_redis.url)
