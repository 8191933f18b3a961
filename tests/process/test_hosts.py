"""Several engine hosts on one consumer group: consumers named `<engine_id>-<slot>`, and a
host gone for good (killed whole with SIGKILL) has its entries reclaimed by another and
its consumers deleted once they hold nothing and have idled past claim_idle_ms."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
from support import add_products, all_done, announce, log_rows, push_orders, rows_at_least

from engine.config import load_settings
from engine.keys import GROUP
from engine.process.health import SaleCollector
from engine.process.worker import consumer_name
from engine.testing.invariants import assert_one_id_per_order
from engine.testing.processes import EngineProcess
from engine.testing.taps import EventTap
from engine.testing.waits import wait_for

pytestmark = pytest.mark.timeout(300)

ORDERS = 20_000
CLAIM_IDLE_MS = 3000


def test_consumers_are_named_by_engine_id_and_the_default_is_unique_per_boot():
    assert consumer_name(1, "rack7-a") == "rack7-a-1"
    default = load_settings(env={}).effective_engine_id()
    host, boot = default.rsplit("-", 1)
    assert host == os.uname().nodename and len(boot) == 8
    assert load_settings(env={"SECKILL_ENGINE_ID": "pod-3"}).effective_engine_id() == "pod-3"


async def consumers(redis, keys, pid) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"])
            for c in await redis.xinfo_consumers(keys.stream(pid), GROUP)}


def kill_whole(engine: EngineProcess) -> None:
    """The host is gone: its workers and its supervisor die at once, nothing drains."""
    for pid in engine.children():
        os.kill(pid, signal.SIGKILL)
    engine.signal(signal.SIGKILL)


async def test_a_host_killed_whole_is_finished_by_the_other_and_forgotten(
        settings, redis, keys, product_id):
    pid = product_id
    gone_id, live_id = (f"host-{name}-{uuid.uuid4().hex[:6]}" for name in ("gone", "live"))
    await add_products(settings, [pid])
    await announce(redis, keys, pid)
    tuning = dict(claim_idle_ms=CLAIM_IDLE_MS, janitor_interval=0.5, batch_size=200)
    async with EventTap(settings.amqp_url) as tap:
        gone = EngineProcess(settings, workers=2, engine_id=gone_id, **tuning)
        live = EngineProcess(settings, workers=1, engine_id=live_id, **tuning)
        try:
            await wait_for(lambda: gone.booted(2), 30, "the first host's two workers")
            await wait_for(lambda: live.booted(1), 30, "the second host's worker")
            await push_orders(redis, keys, pid, range(1, ORDERS + 1))
            await wait_for(lambda: rows_at_least(settings, [pid], 2000), 60, "work under way")
            kill_whole(gone)
            await asyncio.to_thread(gone.wait, 10)
            held = await consumers(redis, keys, pid)
            assert set(held) == {f"{gone_id}-0", f"{gone_id}-1", f"{live_id}-0"}
            await wait_for(lambda: all_done(settings, redis, keys, [pid], ORDERS), 180,
                           "every order, the dead host's pending ones reclaimed")
            events = await tap.collect(ORDERS, timeout=60)

            async def forgotten() -> bool:
                return set(await consumers(redis, keys, pid)) == {f"{live_id}-0"}

            await wait_for(forgotten, 30, "the dead host's consumers deleted")
        finally:
            gone.stop()
            live.stop()
    assert_one_id_per_order(await log_rows(settings, [pid]), events, ORDERS)
    out = live.output()
    assert "idle consumers holding nothing" in out, out[-3000:]
    # the dead host held entries when it died, and the live one took them over
    assert sum(n for name, n in held.items() if name.startswith(gone_id)) > 0, held
    assert "reclaimed" in out, out[-3000:]


def _sale_samples(collector: SaleCollector) -> list:
    return [s for family in collector.collect() if family.name == "seckill_stream_length"
            for s in family.samples]


async def test_only_one_host_exports_the_per_sale_gauges(settings, redis, keys, product_id):
    """Every host reads the same figures; summed over hosts they must count each sale once."""
    await announce(redis, keys, product_id)
    first = SaleCollector(settings.replace(engine_id="host-a"))
    second = SaleCollector(settings.replace(engine_id="host-b"))
    assert len(_sale_samples(first)) == 1 and _sale_samples(second) == []
    assert len(_sale_samples(first)) == 1 and _sale_samples(second) == []  # kept, not taken
    await redis.delete(keys.gauge_exporter)  # the first host stopped scraping long ago
    assert len(_sale_samples(second)) == 1 and _sale_samples(first) == []
