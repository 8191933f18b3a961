"""Opening connections to Redis, RabbitMQ and PostgreSQL, with one kind of failure.

Every process (CLI, workers, gate, Resource Domain) connects the same way:
with a timeout, and turning the library's own exception zoo into
`ServiceUnavailable` whose message names the service and its masked URL.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import aiormq
import asyncpg
import redis as sync_redis_lib
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.connection import SSLConnection
from redis.exceptions import RedisClusterException, RedisError

from engine.config import Settings, mask_url
from engine.errors import ServiceError, ServiceUnavailable, one_line

if TYPE_CHECKING:
    from aiormq.abc import AbstractConnection

# Connection-level failures worth a retry, across the three client libraries.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    RedisError,
    # the cluster client's own failures (no slot covered, too many redirections while a
    # reshard or failover settles, a transaction spanning slots) are not RedisErrors;
    # MOVED, ASK, TRYAGAIN and CLUSTERDOWN replies are (ResponseError / ClusterError)
    RedisClusterException,
    aiormq.exceptions.AMQPError,
    # aiormq's "the channel is closed" is a RuntimeError, not an AMQPError: a broker
    # restart raises it from any channel call, and it passes like the outage does
    aiormq.exceptions.ChannelInvalidStateError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,
)
# What a failed, unreachable or silent PostgreSQL raises from any call.
PG_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
# What a long-running loop retries with backoff: the outages above, and our own named
# service failures (ServiceUnavailable from a reconnect, PublishFailed, DatabaseFailed).
RETRYABLE: tuple[type[BaseException], ...] = (ServiceError, *TRANSIENT_ERRORS)
# What any Redis call may raise when Redis (one server or a cluster) fails or moves.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisError, RedisClusterException, OSError, TimeoutError)

# `redis+cluster://[user:password@]host:port,host:port/0`: a Redis Cluster, found from
# any of the listed nodes (list two or three: one that is down is skipped).
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_startup(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The (host, port) startup nodes and the connection options of a cluster URL."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    options: dict[str, Any] = {"ssl": CLUSTER_SCHEMES[parts.scheme]}
    if userinfo:
        user, _, password = userinfo.partition(":")
        options.update(username=unquote(user) or None, password=unquote(password) or None)
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        nodes.append((host.strip("[]"), int(port)))
    return nodes, options


def is_cluster(client: object) -> bool:
    """Whether `client` talks to a Redis Cluster (per-slot commands) or one server."""
    return isinstance(client, RedisCluster | sync_redis_lib.RedisCluster)


def redis_client(settings: Settings, **kwargs: Any) -> Redis:
    """An asyncio client of `redis_url`, one server or a cluster, not yet connected.

    A `RedisCluster` offers the same command methods as `Redis`, so callers keep one
    type; the few that must split work by slot ask `is_cluster()`.
    """
    options: dict[str, Any] = dict(
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.redis_socket_timeout(), socket_keepalive=True)
    options.update(kwargs)
    if not is_cluster_url(settings.redis_url):
        return Redis.from_url(settings.redis_url, connection_class=ResetSafeConnection,
                              **options)
    nodes, auth = cluster_startup(settings.redis_url)
    options.pop("max_connections", None)  # per node in a cluster: its own default
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **auth, **options)
    _reset_safe(client)
    return cast(Redis, client)


def _reset_safe(client: RedisCluster) -> None:
    """Every node of `client`, found now or later, on a ResetSafeConnection.

    The asyncio RedisCluster takes no connection_class: it builds its nodes from one
    dict of connection options, so the class is set there (and on the startup nodes,
    built already, not yet connected). Without it a command written to a master just
    killed raised uvloop's RuntimeError, and a worker's discovery loop died of it
    during a failover (tests/cluster/test_cluster_faults.py).
    """
    safe = ResetSafeSSLConnection if _is_ssl(client) else ResetSafeConnection
    client.nodes_manager.connection_kwargs["connection_class"] = safe
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = safe


def _is_ssl(client: RedisCluster) -> bool:
    return issubclass(client.nodes_manager.connection_kwargs.get("connection_class", object),
                      SSLConnection)


def sync_redis(settings: Settings, *, timeout: float) -> sync_redis_lib.Redis:
    """A blocking client of `redis_url` (stats, the scrape-time gauges), cluster or not."""
    if not is_cluster_url(settings.redis_url):
        return sync_redis_lib.Redis.from_url(settings.redis_url, socket_timeout=timeout,
                                             socket_connect_timeout=timeout)
    nodes, auth = cluster_startup(settings.redis_url)
    return cast(sync_redis_lib.Redis, sync_redis_lib.RedisCluster(
        startup_nodes=[sync_redis_lib.cluster.ClusterNode(h, p) for h, p in nodes],
        socket_timeout=timeout, socket_connect_timeout=timeout, **auth))


async def connect_redis(settings: Settings, **kwargs: Any) -> Redis:
    """A Redis client that has answered PING.

    Every command has a socket timeout, so a server that stops answering fails the
    command (a retryable RedisError) instead of hanging it while the heartbeat beats on.
    """
    client = redis_client(settings, **kwargs)
    try:
        if is_cluster(client):  # learns the slot map from the first node that answers
            await asyncio.wait_for(cast(RedisCluster, client).initialize(),
                                   settings.connect_timeout)
        await asyncio.wait_for(client.ping(), settings.connect_timeout)
    except REDIS_ERRORS as exc:
        await client.aclose()
        raise ServiceUnavailable(f"Redis at {mask_url(settings.redis_url)}: {_why(exc)}") from exc
    return client


def amqp_brokers(url: str) -> list[str]:
    """One URL per broker of `amqp://user:pass@h1:5672,h2:5672,h3/vhost?query` (the
    credentials, vhost and query shared); a single-host URL is a list of itself."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [url]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host.strip()}"))
            for host in hosts.split(",") if host.strip()]


# Per amqp_url: the broker the last connection went to. A reconnect (after a loss)
# starts with the next one, so a stopped node is not waited on first; the first
# connection of a process tries the list in order.
_last_broker: dict[str, int] = {}


async def connect_amqp(settings: Settings) -> AbstractConnection:
    """An open AMQP connection to the first broker of `amqp_url` that answers; with
    several, a reconnect starts from the one after the broker used last."""
    brokers = amqp_brokers(settings.amqp_url)
    start = (_last_broker[settings.amqp_url] + 1) if settings.amqp_url in _last_broker else 0
    failures = []
    for step in range(len(brokers)):
        index = (start + step) % len(brokers)
        try:
            conn = await asyncio.wait_for(aiormq.connect(brokers[index]),
                                          settings.connect_timeout)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            failures.append((brokers[index], exc))
            continue
        _last_broker[settings.amqp_url] = index
        return conn
    why = "; ".join(f"{mask_url(url)}: {_why(exc)}" for url, exc in failures)
    if len(brokers) == 1:
        raise ServiceUnavailable(f"RabbitMQ at {why}") from failures[0][1]
    raise ServiceUnavailable(f"RabbitMQ: no broker answered ({why})") from failures[-1][1]


async def connect_pg(settings: Settings, **kwargs: Any) -> asyncpg.Connection:
    """One PostgreSQL connection (commands and tests; workers use a pool)."""
    try:
        return await asyncpg.connect(settings.pg_dsn, timeout=settings.connect_timeout, **kwargs)
    except PG_ERRORS as exc:
        raise ServiceUnavailable(
            f"PostgreSQL at {mask_url(settings.pg_dsn)}: {_why(exc)}") from exc


async def create_pg_pool(settings: Settings, *, size: int, **kwargs: Any) -> asyncpg.Pool:
    """A pool of `size` connections, all open before it is returned."""
    try:
        pool = await asyncio.wait_for(
            asyncpg.create_pool(settings.pg_dsn, min_size=size, max_size=size,
                                timeout=settings.connect_timeout, **kwargs),
            settings.connect_timeout * 2)
    except PG_ERRORS as exc:
        raise ServiceUnavailable(
            f"PostgreSQL at {mask_url(settings.pg_dsn)}: {_why(exc)}") from exc
    assert pool is not None
    return pool


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    return one_line(exc)


class _ResetSafe(RedisConnection):
    """A Redis connection that fails a write to a reset connection as a connection error.

    Under uvloop a command written after the peer reset the connection (and before a read
    noticed it) raises RuntimeError ("the handler is closed"), not the OSError of plain
    asyncio: redis-py then passes it on as it is, and a worker took it for a bug and
    exited. Seen through the fault proxy's cut (tests/chaos/test_network_faults.py).

    A connection closed under the command by another task (the cluster client closes
    every node's connections, in use or not, when it reloads its slot map during a
    failover) has no writer left: that is a lost connection too, not the AttributeError
    of which a worker's janitor died (tests/cluster/test_cluster_faults.py).
    """

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        if self._writer is None:
            raise ConnectionResetError("Redis connection closed under the command")
        if self._writer.transport.is_closing():
            raise ConnectionResetError("Redis connection reset by the peer")
        await super()._send_packed_command(command)


class ResetSafeConnection(_ResetSafe):
    """A plain TCP connection, reset-safe (see `_ResetSafe`)."""


class ResetSafeSSLConnection(_ResetSafe, SSLConnection):
    """A TLS connection (`rediss+cluster://`), reset-safe."""
