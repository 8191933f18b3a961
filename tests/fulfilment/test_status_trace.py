"""A sampled order's status report ends its trace: a span for the report's application,
a child of the Resource Domain's span named in its headers, with the unit handed on as
an event (and the hand-off's log line naming the trace); a report without the headers
makes no span."""

from __future__ import annotations

import logging

import pytest
from support import sold_out_sale

from engine.amqp.consumer import Delivery
from engine.fulfilment.status_consumer import StatusConsumer, encode_report
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.orderstates import FAILED, RUNNING
from engine.testing.otlp import KeptSpans
from engine.tracing import Tracing

pytestmark = pytest.mark.timeout(60)
CONTEXT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"



async def test_a_failed_sampled_order_ends_with_its_unit_handed_on(settings, env, product_id,
                                                                   caplog):
    redis, pool, _ = env
    failed, running = await sold_out_sale(pool, Gate(redis, Keys(settings.key_prefix)),
                                          product_id)
    tracing = Tracing.create(KeptSpans(), "seckill-engine", count=lambda what, n: None)
    consumer = StatusConsumer(settings, redis, pool, tracing=tracing)
    reports = [
        Delivery(1, encode_report(failed.instance_id, FAILED, reason="no GPU",
                                  user_id=failed.user_id, product_id=product_id),
                 consumer.reporter, headers={"traceparent": CONTEXT}),
        Delivery(2, encode_report(running.instance_id, RUNNING, user_id=running.user_id,
                                  product_id=product_id), consumer.reporter)]
    with caplog.at_level(logging.INFO, logger="seckill.status"):
        await consumer.handle(reports)
    tracing.flush()
    [span] = tracing.processor.exporter.spans
    tracing.close()
    assert span.name == "status.update" and span.parent.span_id == int(CONTEXT[36:52], 16)
    assert span.context.trace_id == int(CONTEXT[3:35], 16)
    assert span.attributes["seckill.status"] == FAILED
    [event] = span.events
    assert (event.name, event.attributes["seckill.result"]) == ("unit_handed_on", "refunded")
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "compensation"]
    assert line.trace_id == CONTEXT[3:35] and line.span_id == f"{span.context.span_id:016x}"
