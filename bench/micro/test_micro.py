"""Micro-benchmarks of the per-order work (`make bench-micro`, pytest-benchmark).

Each one times a batch of 500, the engine's default batch size, so the
figures read directly as "per batch"; divide by 500 for per order.
"""

from __future__ import annotations

import asyncio

import pytest

from engine.amqp.framing import Framer
from engine.amqp.topology import EXCHANGE, RK_CREATED
from engine.keys import Keys
from engine.pipeline.events import build_messages, created_body, product_prefix
from engine.pipeline.ids import Snowflake
from engine.pipeline.orderrows import stage_rows
from engine.pipeline.orders import Entry, Order, decode_batch
from engine.products import Product

N = 500
KEYS = Keys("bench:")
STREAM = KEYS.stream(1001).encode()
PRODUCT = Product(1001, "GPU 计算实例", 8, 32768, "A100", "ubuntu:22.04")
PREFIX = product_prefix(PRODUCT)
ENTRIES = [Entry(STREAM, f"1700000000000-{i}", {b"uid": str(100 + i).encode(),
                                                 b"ts": b"1700000000", b"sale": b"s-1",
                                                 b"slot": str(i + 1).encode()})
           for i in range(N)]


def orders() -> list[Order]:
    out, _ = decode_batch(ENTRIES, KEYS, 4096)
    for i, o in enumerate(out):
        o.instance_id = 10**15 + i
    return out


def test_snowflake_take_500(benchmark):
    gen = Snowflake(7)
    ids = benchmark(gen.take, N)
    assert len(set(ids)) == N


def test_decode_batch_500(benchmark):
    out, dead = benchmark(decode_batch, ENTRIES, KEYS, 4096)
    assert len(out) == N and not dead


def test_stage_rows_500(benchmark):
    batch = orders()
    rows = benchmark(stage_rows, batch)
    assert len(rows) == N


def test_event_encoding_500(benchmark):
    batch = orders()
    messages = benchmark(build_messages, batch, {1001: PREFIX}, 1700000000)
    assert len(messages) == N


def test_one_event_body(benchmark):
    order = orders()[0]
    body = benchmark(created_body, PREFIX, order, 1700000000)
    assert body.startswith(PREFIX)


def test_amqp_framing_500(benchmark):
    framer = Framer.create(1, EXCHANGE, RK_CREATED, "INSTANCE_CREATED")
    messages = build_messages(orders(), {1001: PREFIX}, 1700000000)

    def frame_all() -> bytes:
        return b"".join(framer.publish(m.body, m.message_id, 1700000000) for m in messages)

    assert len(benchmark(frame_all)) > N * 100


@pytest.fixture
def gate_loop():
    from redis.asyncio import Redis

    from engine.gate.redis_gate import Gate

    loop = asyncio.new_event_loop()
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    keys = Keys("bench:micro:")
    gate = Gate(redis, keys)
    loop.run_until_complete(gate.open_sale(1001, 10**9, clear_buyers=True))
    yield loop, gate
    loop.run_until_complete(redis.delete(*[keys.stock(1001), keys.sale(1001), keys.buyers(1001),
                                           keys.stream(1001), keys.streams]))
    loop.run_until_complete(redis.aclose())
    loop.close()


def test_one_gate_call(benchmark, gate_loop):
    loop, gate = gate_loop
    users = iter(range(1, 10**9))
    result = benchmark(lambda: loop.run_until_complete(gate.buy(1001, next(users))))
    assert result.outcome == "accepted"
