"""The Protobuf contract: the seed's example, the wire format, the upb backend, freshness."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.internal import api_implementation

from engine.pb import event_pb2
from engine.pipeline.events import created_body, product_prefix
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
