"""Metrics of the HTTP gate: requests by endpoint and result, and their latency.

Labels carry the endpoint name and the status code only, never a user,
product or URL, so their number stays small whatever the traffic.
"""

from __future__ import annotations

import os

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
LATENCY = Histogram("seckill_bff_request_duration_seconds", "HTTP request latency.",
                    ["endpoint"], buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
# a miss of the verified-token cache: with the cache working, a small share of requests
TOKENS = Counter("seckill_bff_token_verifications_total",
                 "Bearer tokens checked by signature (verified-token cache misses), by result.",
                 ["result"])
CONTENT_TYPE = CONTENT_TYPE_LATEST


_children: dict[tuple[str, int], tuple[object, object]] = {}


def observe(endpoint: str, status: int, seconds: float) -> None:
    """Per request: the labelled children are looked up once per (endpoint, status)."""
    pair = _children.get((endpoint, status))
    if pair is None:
        pair = _children[endpoint, status] = (REQUESTS.labels(endpoint, str(status)),
                                              LATENCY.labels(endpoint))
    pair[0].inc()  # type: ignore[attr-defined]
    pair[1].observe(seconds)  # type: ignore[attr-defined]


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
