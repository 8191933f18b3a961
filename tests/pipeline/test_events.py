"""The Protobuf contract: the seed's example, the wire format, the upb backend, freshness."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.internal import api_implementation

from engine.pb import event_pb2
from engine.pipeline.events import build_events, build_messages, created_body, product_prefix
from engine.pipeline.orders import Order
from engine.products import Product

ROOT = Path(__file__).resolve().parents[2]
SEED_EXAMPLE = """{
  "event_type": "INSTANCE_CREATED", "instance_id": 1234567890, "user_id": 123,
  "name": "GPU 计算实例",
  "spec": {"cpus": 8, "memory_mb": 32768, "gpu": "A100", "image": "ubuntu:22.04"},
  "timestamp": 1705478400
}"""


def test_seed_json_example_round_trips_through_the_wire():
    event = json_format.Parse(SEED_EXAMPLE, event_pb2.Event())
    assert event.event_type == event_pb2.INSTANCE_CREATED and event.spec.memory_mb == 32768
    again = event_pb2.Event.FromString(event.SerializeToString())
    assert again == event and again.name == "GPU 计算实例" and again.timestamp == 1705478400


def test_seed_field_numbers_are_kept():
    fields = {f.name: f.number for f in event_pb2.Event.DESCRIPTOR.fields}
    assert [fields[n] for n in ("event_type", "instance_id", "user_id", "name", "spec",
                                "timestamp")] == [1, 2, 3, 4, 5, 6]
    assert min(v for k, v in fields.items() if k not in ("event_type", "instance_id",
               "user_id", "name", "spec", "timestamp")) >= 7


def test_upb_backend_is_in_use():
    assert api_implementation.Type() == "upb"


def test_prefix_plus_tail_decodes_to_the_whole_event():
    product = Product(1001, "GPU 计算实例", 8, 32768, "A100", "ubuntu:22.04")
    order = Order(1001, 123, "1705478400000-0", 1705478400, "s-1", 7, b"x", 1234567890)
    event = event_pb2.Event.FromString(created_body(product_prefix(product), order, 1705478401))
    assert json_format.MessageToDict(event, preserving_proto_field_name=True) == {
        "event_type": "INSTANCE_CREATED", "instance_id": "1234567890", "user_id": "123",
        "name": "GPU 计算实例", "timestamp": "1705478401", "product_id": "1001",
        "spec": {"cpus": 8, "memory_mb": 32768, "gpu": "A100", "image": "ubuntu:22.04"},
        "stream_id": "1705478400000-0", "sale_id": "s-1", "slot": 7}


def test_committed_generated_code_is_fresh(tmp_path):
    # Fails rather than skips: a check that silently skips lets stale code through CI.
    assert importlib.util.find_spec("grpc_tools") is not None, \
        "grpcio-tools is missing: it is in the test extra (pip install -e '.[test]', or make test)"
    subprocess.run([str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("event_pb2.py", "event_pb2.pyi"):
        assert (tmp_path / name).read_bytes() == (ROOT / "engine" / "pb" / name).read_bytes(), \
            f"engine/pb/{name} is stale: run `make proto` and commit"


# Values at every varint length boundary, zeros (left out by proto3) and negatives.
NUMBERS = [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 2**31 - 1, 2**62 + 12_345,
           (1_234_567 << 22) | (5 << 12) | 4_095, 2**63 - 1]


def generated(prefix: bytes, order: Order, now: int) -> bytes:
    return prefix + event_pb2.Event(
        instance_id=order.instance_id, user_id=order.user_id, timestamp=now,
        stream_id=order.stream_id, sale_id=order.sale_id or "",
        slot=order.slot or 0).SerializeToString()


def orders_for_bytes() -> list[Order]:
    out = []
    for i, n in enumerate(NUMBERS):
        slot = n if n < 2**31 else 2**31 - 1
        out += [Order(1001, n, f"{n}-{i}", 0, "s-1", slot, b"x", n),
                Order(1002, NUMBERS[-1 - i], "1705478400000-0", 0, None, None, b"x",
                      NUMBERS[i] | 1),
                Order(1001, 5, "x" * 200, 0, "é" * 70, 1, b"x", n // 2 + 1)]  # 2-byte lengths
    return out + [Order(1001, -1, "", 0, "", -3, b"x", -5)]  # negatives, empty strings


def test_hand_built_events_are_the_generated_class_byte_for_byte():
    prefixes = {1001: product_prefix(Product(1001, "GPU 计算实例", 8, 32768, "A100", "u:22")),
                1002: product_prefix(Product(1002, "", 0, 0, "", ""))}
    orders = orders_for_bytes()
    for now in (0, 1705478401, 2**40):
        bodies, ids = build_events(orders, prefixes, now)
        assert ids == [str(o.instance_id) for o in orders]
        for order, body in zip(orders, bodies, strict=True):
            expected = generated(prefixes[order.product_id], order, now)
            assert body == expected, order
            assert created_body(prefixes[order.product_id], order, now) == expected
        messages = build_messages(orders, prefixes, now)
        assert [m.body for m in messages] == bodies


def test_the_byte_check_sees_a_changed_field():
    prefix = product_prefix(Product(1001, "GPU", 8, 32768, "A100", "u:22"))
    order = Order(1001, 123, "1705478400000-0", 0, "s-1", 7, b"x", 1234567890)
    body = build_events([order], {1001: prefix}, 1705478401)[0][0]
    order.slot = 8
    assert body != generated(prefix, order, 1705478401)


def test_events_decode_with_an_independent_copy_of_the_proto(tmp_path):
    """Compiled here from a copy of proto/event.proto (its own package, so its own
    classes): what a consumer built from the contract alone would read."""
    from grpc_tools import protoc

    text = (ROOT / "proto" / "event.proto").read_text()
    (tmp_path / "copy_event.proto").write_text(
        text.replace("package seckill.mq.v1;", "package independent.copy.v1;"))
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        str(tmp_path / "copy_event.proto")]) == 0
    spec = importlib.util.spec_from_file_location("copy_event_pb2",
                                                  tmp_path / "copy_event_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    product = Product(1001, "GPU 计算实例", 8, 32768, "A100", "ubuntu:22.04")
    order = Order(1001, 123, "1705478400000-0", 1705478400, "s-1", 7, b"x",
                  (1_234_567 << 22) | 4_095)
    body = build_events([order], {1001: product_prefix(product)}, 1705478401)[0][0]
    event = module.Event.FromString(body)
    assert (event.event_type, event.instance_id, event.user_id, event.name, event.timestamp,
            event.product_id, event.stream_id, event.sale_id, event.slot) == (
        module.INSTANCE_CREATED, order.instance_id, 123, "GPU 计算实例", 1705478401, 1001,
        "1705478400000-0", "s-1", 7)
    assert (event.spec.cpus, event.spec.memory_mb, event.spec.gpu, event.spec.image) == (
        8, 32768, "A100", "ubuntu:22.04")
