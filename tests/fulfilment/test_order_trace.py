"""One sampled order is one trace, from the BFF to its status update, exported over
OTLP/HTTP to a real receiver; an unsampled order makes no span; a client's own
`traceparent` forces nothing unless it came through a trusted proxy.

Every process runs as it would in production (`seckill bff`, `seckill run`,
`seckill resource-domain`), with `trace_endpoint` at the test's receiver and a sample
ratio so small that only the trusted proxy's sampled `traceparent` makes a trace.
The processes are stopped before the spans are counted: each exports what it holds
when it stops, so an absent span is absent, not late.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from support import add_products, pg_fetch
from test_closed_loop import ResourceDomainProcess

from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.orderstates import RUNNING
from engine.testing.bff import Bff
from engine.testing.otlp import OtlpReceiver, ReceivedSpan
from engine.testing.processes import EngineProcess
from engine.testing.waits import wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fresh_queues")]

PROXY_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PROXY_SPAN = "00f067aa0ba902b7"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
BUY = "/api/v1/seckill/{pid}"


def tracing_env(receiver: OtlpReceiver) -> dict[str, object]:
    # on, but a ratio no attempt of this test will draw: only a trusted parent samples
    return {"trace_sample": 1e-9, "trace_endpoint": receiver.endpoint}


def buy(url: str, pid: int, uid: int, traceparent: str | None = None) -> int:
    headers = {"traceparent": traceparent} if traceparent else {}
    return httpx.post(url + BUY.format(pid=pid), json={"user_id": uid}, headers=headers,
                      timeout=10).status_code


def one(spans: list[ReceivedSpan], name: str, parent: ReceivedSpan | None = None
        ) -> ReceivedSpan:
    found = [s for s in spans if s.name == name
             and (parent is None or s.parent_id == parent.span_id)]
    assert len(found) == 1, (name, [(s.name, s.span_id, s.parent_id) for s in spans])
    return found[0]


async def test_a_sampled_order_is_one_trace_from_the_bff_to_its_status(
        settings: Settings, product_id: int, tmp_path):
    pid = product_id
    await add_products(settings, [pid])
    redis = Redis.from_url(settings.redis_url)
    await Gate(redis, Keys(settings.key_prefix)).open_sale(pid, 10, clear_buyers=True)
    with OtlpReceiver() as receiver:
        env = tracing_env(receiver)
        engine = EngineProcess(settings, workers=1, **env)
        rd = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=20,
                                   **env)
        trusting = Bff(settings, bff_auth="none", bff_trusted_proxies="127.0.0.1", **env)
        stranger = Bff(settings, bff_auth="none", **env)
        try:
            assert buy(trusting.url, pid, 1) == 202  # no parent: the ratio says no
            assert buy(trusting.url, pid, 2, f"00-{PROXY_TRACE}-{PROXY_SPAN}-01") == 202
            assert buy(stranger.url, pid, 3, f"00-{CLIENT_TRACE}-{PROXY_SPAN}-01") == 202

            async def all_running() -> bool:
                rows = await pg_fetch(settings.pg_dsn, "SELECT count(*) FROM seckill_logs "
                                      "WHERE product_id = $1 AND status = $2", pid, RUNNING)
                return rows[0][0] == 3
            await wait_for(all_running, 60, "three orders RUNNING")
        finally:
            for process in (trusting, stranger, rd, engine):
                process.stop()
            await redis.aclose()
        spans = receiver.spans()

    trace = [s for s in spans if s.trace_id == PROXY_TRACE]
    dump = os.environ.get("SECKILL_TRACE_DUMP")  # bench/tracetree.py draws it
    if dump:
        Path(dump).write_text(json.dumps([dataclasses.asdict(s) for s in trace]))
    others = [s for s in spans if s.trace_id != PROXY_TRACE]
    # the BFF's span continues the proxy's, the engine's order span continues the BFF's
    bff = one(trace, "POST " + BUY.replace("{pid}", "{product_id}"))
    assert (bff.service, bff.kind, bff.parent_id) == ("seckill-bff", "server", PROXY_SPAN)
    assert bff.attributes["http.response.status_code"] == 202
    order = one(trace, "engine.order", bff)
    assert (order.service, order.kind) == ("seckill-engine", "consumer")
    assert [name for name, _ in order.events] == ["read", "logged", "published", "acked"]
    assert [at for _, at in order.events] == sorted(at for _, at in order.events)
    assert order.start_ns <= order.events[0][1] and order.events[-1][1] <= order.end_ns
    # the Resource Domain continues the INSTANCE_CREATED message's context, the status
    # consumer the status report's
    provision = one(trace, "resource_domain.provision", order)
    assert provision.service == "seckill-resource-domain"
    update = one(trace, "status.update", provision)
    assert update.service == "seckill-engine" and update.attributes["seckill.status"] == RUNNING
    # besides the order's trace, only its batch's own: a span per stage, the batch's span
    # linked to the order
    assert len({s.trace_id for s in others}) == 1
    batch = one(others, "engine.batch")
    assert batch.links == ((PROXY_TRACE, order.span_id),)
    assert sorted(s.name for s in others if s.parent_id == batch.span_id) == [
        "engine.ack", "engine.log", "engine.publish", "engine.read"]
    # the unsampled order and the stranger's made nothing: their trace IDs never appear
    assert not [s for s in spans if s.trace_id == CLIENT_TRACE]
    assert len(spans) == len(trace) + len(others)
