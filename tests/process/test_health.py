"""The supervisor's /metrics, /healthz and /readyz."""

from __future__ import annotations

import collections
import json
import urllib.request

import pytest
from support import add_products, all_done, announce, push_orders

from engine.testing.ports import free_port
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)


async def test_metrics_health_and_readiness(settings, redis, keys, product_id):
    await add_products(settings, [product_id])
    await announce(redis, keys, product_id)
    port = free_port()
    engine = EngineProcess(settings, workers=2, metrics_port=port)
    try:
        await push_orders(redis, keys, product_id, range(1, 1001))
        await wait_for(lambda: all_done(settings, redis, keys, [product_id], 1000), 60, "orders")
        await wait_for(lambda: _http_ok(port, "/healthz"), 20, "/healthz")
        await wait_for(lambda: _workers_reported(port, 2), 20, "2 workers in /healthz")
        ready = json.loads(_get(port, "/readyz"))
        assert ready == {"ready": True, "services": {"redis": "ok", "rabbitmq": "ok",
                                                     "postgresql": "ok"}}
        text = _get(port, "/metrics")
    finally:
        engine.stop()
    samples = collections.Counter(line.split("{")[0].split(" ")[0] for line in text.splitlines()
                                  if line and not line.startswith("#"))
    assert "seckill_orders_processed_total" in samples
    processed = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("seckill_orders_processed_total"))
    assert processed == 1000
    assert f'seckill_stream_lag{{product="{product_id}"}} 0.0' in text
    assert f'seckill_stream_pending{{product="{product_id}"}} 0.0' in text
    assert "seckill_order_latency_seconds_bucket" in text
    assert "guest:guest" not in text and "postgres@" not in text


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


async def _workers_reported(port: int, n: int) -> bool:
    return json.loads(_get(port, "/healthz"))["workers"] == n


async def _http_ok(port: int, path: str) -> bool:
    try:
        _get(port, path)
        return True
    except OSError:
        return False
