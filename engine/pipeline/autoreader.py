"""The reader for the client at hand, chosen once at start (as uvicorn's `auto` picks
an HTTP protocol): a cluster needs one command per slot, a single Redis one for all."""

from __future__ import annotations

from redis.asyncio import Redis

from engine.connections import is_cluster
from engine.keys import Keys
from engine.pipeline.clusterreader import ClusterReader
from engine.pipeline.reader import StreamReader
from engine.pipeline.redisreader import RedisReader


def open_reader(redis: Redis, keys: Keys, consumer: str, *, batch_size: int, block_ms: int,
                max_deliveries: int) -> StreamReader:
    """A `ClusterReader` for a Redis Cluster client, else a `RedisReader`."""
    kind = ClusterReader if is_cluster(redis) else RedisReader
    return kind(redis, keys, consumer, batch_size, block_ms, max_deliveries)
