"""Prometheus metrics of the workers, bumped once per batch, never per order.

In `seckill run` the supervisor sets `PROMETHEUS_MULTIPROC_DIR` before this
module is imported, so every worker writes its own files and the supervisor
serves their sum. Gauges about the streams themselves (lag, pending, dead
letters) are not here: the supervisor reads them from Redis at scrape time,
so they are exported once and not N times.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, multiprocess

LATENCY_BUCKETS = (.001, .002, .003, .005, .0075, .01, .015, .02, .025, .03, .04, .05, .075, .1,
                   .15, .2, .25, .5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

ORDERS = Counter("seckill_orders_processed_total",
                 "Orders logged, published, confirmed and acknowledged.")
REDELIVERED = Counter("seckill_orders_redelivered_total",
                      "Orders found already logged; re-published with their first instance ID.")
DEAD_LETTERS = Counter("seckill_orders_dead_lettered_total",
                       "Stream entries moved to the dead-letter stream.", ["reason"])
PUBLISH_FAILURES = Counter("seckill_publish_failures_total",
                           "Events not confirmed by the broker.", ["outcome"])
BATCH_FAILURES = Counter("seckill_batch_failures_total",
                         "Batch attempts that failed and were retried.", ["stage"])
RECLAIMED = Counter("seckill_entries_reclaimed_total",
                    "Entries claimed from idle consumers by the janitor.")
LEASE_LOST = Counter("seckill_node_lease_lost_total",
                     "Snowflake node-ID leases lost (IDs stopped until re-acquired).")
REDIS_STATE_LOST = Counter("seckill_redis_state_lost_total",
                           "Times Redis was found to have lost every key (restarted"
                           " without persistence, flushed): accepted orders not yet"
                           " logged are gone.")
BATCH_SIZE = Histogram("seckill_batch_entries", "Stream entries per batch.",
                       buckets=BATCH_BUCKETS)
STAGE_SECONDS = Histogram("seckill_stage_duration_seconds", "Time spent per batch in a stage.",
                          ["stage"], buckets=LATENCY_BUCKETS)
ORDER_LATENCY = Histogram("seckill_order_latency_seconds",
                          "From the stream entry's creation to its acknowledgement.",
                          buckets=LATENCY_BUCKETS)
INFLIGHT = Gauge("seckill_inflight_batches", "Batches a worker holds.",
                 multiprocess_mode="livesum")
LEASE_HELD = Gauge("seckill_node_lease_held", "1 while the worker holds a node-ID lease.",
                   multiprocess_mode="livesum")

# the status consumer (a task of every worker)
STATUS_UPDATES = Counter("seckill_status_updates_total",
                         "Status reports by what became of them.", ["result"])
COMPENSATIONS = Counter("seckill_compensations_total",
                        "Failed orders whose unit of stock was handled.", ["result"])
STATUS_DEAD_LETTERS = Counter("seckill_status_dead_letters_total",
                              "Status reports moved to stream:seckill:status:dlq.", ["reason"])

# the supervisor
WORKER_RESTARTS = Counter("seckill_worker_restarts_total",
                          "Workers that exited unexpectedly and were respawned.")


def mark_dead(pid: int) -> None:
    """Tell prometheus_client a worker is gone, so its live gauges stop counting."""
    try:
        multiprocess.mark_process_dead(pid)
    except (KeyError, ValueError):  # not in multiprocess mode
        pass


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """Observe many values with one write per bucket instead of one per value.

    prometheus_client has no bulk observe; per-order observes would cost a
    lock and a shared-memory write each.
    """
    bounds = histogram._upper_bounds  # noqa: SLF001 - no public bulk API
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        counts[bisect_left(bounds, value)] += 1
        total += value
    for i, count in enumerate(counts):
        if count:
            histogram._buckets[i].inc(count)  # noqa: SLF001
    histogram._sum.inc(total)  # noqa: SLF001
