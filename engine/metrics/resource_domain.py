"""Prometheus objects of the reference Resource Domain (`seckill resource-domain`).

One process, so prometheus_client's default registry and its own HTTP server serve
them on `rd_metrics_port`.
"""

from __future__ import annotations

from prometheus_client import Counter

PROVISIONED = Counter("seckill_rd_provisioned_total", "Instances provisioned by the "
                      "reference Resource Domain.", ["result"])
RELEASED = Counter("seckill_rd_released_total",
                   "Instances whose objects a release deleted.")
DUPLICATES = Counter("seckill_rd_duplicate_events_total",
                     "INSTANCE_CREATED events for instances already handled.")
DEAD_LETTERS = Counter("seckill_rd_dead_letters_total",
                       "Events the Resource Domain refused (kept in "
                       "resource_domain.dead_letters), by reason.", ["reason"])
