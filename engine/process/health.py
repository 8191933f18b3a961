"""The supervisor's HTTP side: /metrics, /healthz and /readyz on one small server.

It runs in a thread of the supervisor, so it answers even while every
worker is busy. /metrics sums the workers' multiprocess files and adds the
per-sale gauges read from Redis at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from engine.config import Settings, mask_url
from engine.connections import sync_redis
from engine.errors import one_line
from engine.keys import Keys
from engine.sale_figures import read_figures

log = logging.getLogger("seckill.health")

# How many workers are alive and booted: the supervisor's answer, asked at each scrape.
WorkerCount = Callable[[], int]


EXPORTER_TTL_MS = 60_000  # a dead exporter's host is replaced within this


class SaleCollector:
    """Per-sale gauges, read from Redis when Prometheus scrapes.

    The figures are the same whichever host reads them, so with several engine hosts
    only one exports them (a sum over hosts would count each sale once per host): the
    supervisor whose scrape holds the `gauge_exporter` key, taken with SET NX PX and
    kept by its own scrapes; when that host stops scraping, another takes over within
    EXPORTER_TTL_MS. `seckill_sale_gauges_exporter` says which host it is.
    """

    FIELDS = (("stock", "seckill_sale_stock", "Units of stock left in the open sale."),
              ("length", "seckill_stream_length", "Entries in the order stream."),
              ("lag", "seckill_stream_lag", "Entries not yet read by the consumer group."),
              ("pending", "seckill_stream_pending", "Entries read but not acknowledged."),
              ("dead_letters", "seckill_dead_letters", "Entries in the dead-letter stream."),
              ("consumers", "seckill_stream_consumers", "Consumers known to the group."))

    def __init__(self, settings: Settings, alive_workers: WorkerCount | None = None) -> None:
        self.alive_workers = alive_workers
        self.redis = sync_redis(settings, timeout=2)
        self.keys = Keys(settings.key_prefix)
        self.engine_id = settings.effective_engine_id()

    def exporting(self) -> bool:
        """Whether this host exports the per-sale gauges now (taking the role if free)."""
        key = self.keys.gauge_exporter
        if self.redis.set(key, self.engine_id, nx=True, px=EXPORTER_TTL_MS):
            return True
        holder = self.redis.get(key)
        if isinstance(holder, bytes) and holder.decode() == self.engine_id:
            self.redis.pexpire(key, EXPORTER_TTL_MS)
            return True
        return False

    def collect(self) -> Any:
        families = {attr: GaugeMetricFamily(name, doc, labels=["product"])
                    for attr, name, doc in self.FIELDS}
        up = GaugeMetricFamily("seckill_redis_up", "1 if Redis answered the last scrape.")
        role = GaugeMetricFamily("seckill_sale_gauges_exporter",
                                 "1 on the one engine host that exports the per-sale gauges.")
        try:
            exporting = self.exporting()
            figures = read_figures(self.redis, self.keys) if exporting else []
            up.add_metric([], 1)
            role.add_metric([], int(exporting))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis did
            log.warning("stream figures unavailable: %s", exc)
            figures = []
            up.add_metric([], 0)
        for f in figures:
            for attr, family in families.items():
                value = getattr(f, attr)
                if value is not None:
                    family.add_metric([str(f.product_id)], value)
        yield from families.values()
        yield up
        yield role
        if self.alive_workers is not None:
            workers = GaugeMetricFamily("seckill_workers", "Worker processes alive and booted.")
            workers.add_metric([], self.alive_workers())
            yield workers


async def check_services(settings: Settings) -> dict[str, str]:
    """'ok' or the reason, per service."""
    from engine.connections import connect_amqp, connect_pg, connect_redis

    async def redis() -> None:
        client = await connect_redis(settings)
        await client.aclose()

    async def amqp() -> None:
        conn = await connect_amqp(settings)
        await conn.close()

    async def pg() -> None:
        conn = await connect_pg(settings)
        await conn.fetchval("SELECT 1")
        await conn.close()

    out = {}
    for name, check in (("redis", redis), ("rabbitmq", amqp), ("postgresql", pg)):
        try:
            await asyncio.wait_for(check(), settings.connect_timeout + 1)
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - report, don't raise
            out[name] = mask_url(one_line(exc))
    return out


def start_health_server(settings: Settings,
                        alive_workers: WorkerCount | None) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(SaleCollector(settings, alive_workers))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                workers = alive_workers() if alive_workers else 0
                self._json(200, {"status": "ok", "workers": workers})
            elif path == "/readyz":
                checks = asyncio.run(check_services(settings))
                ok = all(v == "ok" for v in checks.values())
                self._json(200 if ok else 503, {"ready": ok, "services": checks})
            else:
                self._json(404, {"error": f"no such path: {path}"})

        def _json(self, code: int, body: dict) -> None:
            self._send(code, orjson.dumps(body), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # scrapes every few seconds are not news

    server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    log.info("serving /metrics on %s:%d", settings.metrics_host, server.server_address[1],
             extra={"event": "http_started", "port": server.server_address[1]})
    return server
