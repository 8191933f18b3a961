"""Metrics of the HTTP gate: requests by endpoint and result, and their latency.

Labels carry the endpoint name and the status code only, never a user,
product or URL, so their number stays small whatever the traffic.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("seckill_bff_requests_total", "HTTP requests by endpoint and status code.",
                   ["endpoint", "code"])
BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1)
LATENCY = Histogram("seckill_bff_request_duration_seconds", "HTTP request latency.",
                    ["endpoint"], buckets=BUCKETS)
# a miss of the verified-token cache: with the cache working, a small share of requests
TOKENS = Counter("seckill_bff_token_verifications_total",
                 "Bearer tokens checked by signature (verified-token cache misses), by result.",
                 ["result"])
CONTENT_TYPE = CONTENT_TYPE_LATEST


BOUNDS = (*BUCKETS, float("inf"))  # a value lands in the first bucket it is <= to
FLUSH_EVERY = 0.1  # seconds: how far the request metrics may lag the answers


class Pending:
    """The requests answered over FLUSH_EVERY seconds, written to Prometheus together.

    In multiprocess mode every value update takes a lock, a `getpid` system call and
    an mmap write: three per request when counted one by one (about a tenth of the
    BFF's own CPU), and still one or two per request when written once per event-loop
    turn (a busy BFF's turns answer a handful of requests each). Here a request costs
    a few dict and list updates, and each (endpoint, code) seen in FLUSH_EVERY seconds
    costs one counter and two histogram writes: a scrape sees a count at most that
    much behind the answers.
    """

    def __init__(self) -> None:
        # (endpoint, status) -> [requests, seconds, per-bucket counts]
        self.window: dict[tuple[str, int], list[Any]] = {}
        self.children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        entry = self.window.get(key)
        if entry is None:
            if not self.window:
                asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
            entry = self.window[key] = [0, 0.0, [0] * len(BOUNDS)]
        entry[0] += 1
        entry[1] += seconds
        entry[2][bisect_left(BOUNDS, seconds)] += 1

    def flush(self) -> None:
        window, self.window = self.window, {}
        for key, (count, seconds, buckets) in window.items():
            pair = self.children.get(key)
            if pair is None:
                pair = self.children[key] = (REQUESTS.labels(key[0], str(key[1])),
                                             LATENCY.labels(key[0]))
            pair[0].inc(count)
            add_to_histogram(pair[1], seconds, buckets)


def add_to_histogram(child: Any, seconds: float, buckets: list[int]) -> None:
    """What `observe` does for each value, for many at once: prometheus_client keeps a
    histogram as a sum and one count per bucket (cumulated when collected), and has no
    public call to add several observations."""
    child._sum.inc(seconds)  # noqa: SLF001
    for value, count in zip(child._buckets, buckets, strict=True):  # noqa: SLF001
        if count:
            value.inc(count)


_pending = Pending()


def observe(endpoint: str, status: int, seconds: float) -> None:
    """One answered request (inside a running event loop)."""
    _pending.observe(endpoint, status, seconds)


def render() -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


# gate_wait_replicas: purchases the master took but too few replicas acknowledged in time
UNREPLICATED = Counter("seckill_bff_unreplicated_total",
                       "Purchases answered 503 'unreplicated': recorded by the Redis master, "
                       "not acknowledged by gate_wait_replicas replicas within gate_wait_ms.")
