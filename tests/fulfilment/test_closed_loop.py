"""Gate -> engine -> Resource Domain -> status, all real processes and services."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import aiormq
import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from support import add_products, pg_fetch, purge_queues

from engine.amqp.logins import ENGINE, login
from engine.amqp.topology import EXCHANGE, QUEUE_STATUS, RK_CREATED
from engine.config import Settings
from engine.gate.redis_gate import Gate
from engine.keys import Keys
from engine.pb import event_pb2
from engine.resource_domain.provisioning import SimulatedProvisioner, manifests, to_yaml
from engine.testing.ports import free_port
from engine.testing.processes import SECKILL, EngineProcess, engine_env, stop_process
from engine.testing.waits import wait_for

# every test here runs a Resource Domain: it starts from empty queues
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("fresh_queues")]


class ResourceDomainProcess:
    """`seckill resource-domain` with its /metrics on a port of its own."""

    def __init__(self, settings, **overrides) -> None:
        self.port = free_port()
        # its log in a file: a pipe nobody reads would block it once full
        self.log = tempfile.NamedTemporaryFile(prefix="seckill-rd-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([SECKILL, "resource-domain"],
                                     env=engine_env(settings, rd_metrics_port=self.port,
                                                    **overrides),
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    async def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics; 0 if not exported (yet)."""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                text = (await client.get(f"http://127.0.0.1:{self.port}/metrics")).text
        except httpx.HTTPError:
            return 0.0
        found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def kill(self) -> None:
        """SIGKILL: no draining, so what it claimed and did not acknowledge comes back."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")


async def publish_created(settings, event: event_pb2.Event) -> None:
    """An INSTANCE_CREATED event as the engine publishes it (again, for a duplicate): as
    its broker user, named in user-id."""
    engine = login(settings, ENGINE)
    conn = await aiormq.connect(engine.url)
    try:
        channel = await conn.channel()
        await channel.confirm_delivery()
        await channel.basic_publish(event.SerializeToString(), exchange=EXCHANGE,
                                    routing_key=RK_CREATED, mandatory=True,
                                    properties=aiormq.spec.Basic.Properties(
                                        delivery_mode=2, message_id=str(event.instance_id),
                                        user_id=engine.user))
    finally:
        await conn.close()


async def statuses(settings, pid) -> dict[str, int]:
    rows = await pg_fetch(settings.pg_dsn, "SELECT status, count(*) FROM seckill_logs"
                          " WHERE product_id = $1 GROUP BY status", pid)
    return {r[0]: r[1] for r in rows}


async def provisioned(settings, pid) -> list[asyncpg.Record]:
    return await pg_fetch(
        settings.pg_dsn, "SELECT i.instance_id, i.attempts, i.status FROM"
        " resource_domain.instances i JOIN seckill_logs l USING (instance_id)"
        " WHERE l.product_id = $1", pid)


async def buy_all(gate: Gate, pid: int, users: range) -> int:
    accepted = 0
    for start in range(0, len(users), 100):
        results = await asyncio.gather(*(gate.buy(pid, u) for u in users[start:start + 100]))
        accepted += sum(r.outcome == "accepted" for r in results)
    return accepted


async def test_2000_orders_end_running_or_failed_once_each(settings, product_id, tmp_path):
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    gate = Gate(redis, Keys(settings.key_prefix))
    await gate.open_sale(product_id, 2000, clear_buyers=True)
    rd_env = {"rd_output_dir": str(tmp_path), "rd_delay_ms": 20, "rd_failure_rate": 0.1,
              "rd_seed": 7}
    engine = EngineProcess(settings, workers=2)
    rd = ResourceDomainProcess(settings, **rd_env)
    try:
        assert await buy_all(gate, product_id, range(1, 2001)) == 2000

        async def some_done() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) >= 500
        await wait_for(some_done, 90, "the first 500 orders provisioned")
        # killed in the middle: every event it held unacknowledged (claimed, provisioned
        # or not, reported or not) is redelivered to the next one
        rd.kill()
        rd = ResourceDomainProcess(settings, **rd_env)

        async def all_final() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) == 2000
        await wait_for(all_final, 200, "all 2,000 orders RUNNING or FAILED")
        after_kill = await rd.metric("seckill_rd_duplicate_events_total")
        await publish_created(settings, await created_event(settings, product_id))

        async def duplicate_seen() -> bool:
            return await rd.metric("seckill_rd_duplicate_events_total") >= after_kill + 1
        await wait_for(duplicate_seen, 30, "the duplicate event counted")
        assert await rd.metric("seckill_rd_provisioned_total", '{result="running"}') > 0
    finally:
        rd.stop()
        engine.stop()
        await redis.aclose()
    rows = await provisioned(settings, product_id)
    assert len(rows) == 2000 and {r["attempts"] for r in rows} == {1}
    assert len(list(Path(tmp_path).glob("*.yaml"))) == 2000
    final = await statuses(settings, product_id)
    assert 100 <= final["FAILED"] <= 320 and final["RUNNING"] + final["FAILED"] == 2000


async def created_event(settings: Settings, pid: int) -> event_pb2.Event:
    """The INSTANCE_CREATED event of one logged order, rebuilt from its row."""
    conn = await asyncpg.connect(settings.pg_dsn)
    try:
        row = await conn.fetchrow("SELECT instance_id, user_id, stream_id FROM seckill_logs"
                                  " WHERE product_id = $1 ORDER BY id LIMIT 1", pid)
    finally:
        await conn.close()
    return event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED,
                           instance_id=row["instance_id"], user_id=row["user_id"],
                           product_id=pid, stream_id=row["stream_id"], timestamp=1,
                           spec=event_pb2.InstanceSpec(cpus=8, memory_mb=32768, gpu="A100",
                                                       image="ubuntu:22.04"))


async def test_the_resource_domain_exports_its_metrics(settings, tmp_path):
    rd = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=1)
    event = event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, user_id=5,
                            instance_id=random.randrange(7 * 10**12, 8 * 10**12),  # no order's
                            spec=event_pb2.InstanceSpec(cpus=2, memory_mb=1024, image="busybox"))
    try:
        await publish_created(settings, event)
        await publish_created(settings, event)

        async def exported() -> bool:
            return (await rd.metric("seckill_rd_provisioned_total", '{result="running"}') == 1
                    and await rd.metric("seckill_rd_duplicate_events_total") == 1)
        await wait_for(exported, 30, "seckill_rd_provisioned_total and one duplicate")
    finally:
        rd.stop()
        await purge_queues(settings.amqp_url, QUEUE_STATUS)
    assert (tmp_path / f"{event.instance_id}.yaml").exists()


async def test_the_resource_domain_rides_out_a_broker_restart(private_rabbitmq_settings,
                                                              private_rabbitmq, tmp_path):
    """The broker goes away under it: it reconnects with backoff, it does not exit.
    The suite's own broker: stopping it must not disturb anyone else's run."""
    settings = private_rabbitmq_settings
    rd = ResourceDomainProcess(settings, rd_output_dir=str(tmp_path), rd_delay_ms=1)
    event = event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, user_id=6,
                            instance_id=random.randrange(8 * 10**12, 9 * 10**12),  # no order's
                            spec=event_pb2.InstanceSpec(cpus=2, memory_mb=1024, image="busybox"))

    async def consuming() -> bool:
        return "consuming" in rd.output()

    async def failed_reconnects() -> bool:
        return rd.output().count("retrying in") >= 2  # the connection lost, one retry failed

    try:
        await wait_for(consuming, 30, "the Resource Domain consuming")
        private_rabbitmq.stop_app()
        try:
            await wait_for(failed_reconnects, 30, "the lost connection and a failed reconnect")
        finally:
            private_rabbitmq.start_app()
        await publish_created(settings, event)

        async def provisioned_once() -> bool:
            return await rd.metric("seckill_rd_provisioned_total", '{result="running"}') == 1
        await wait_for(provisioned_once, 60, "the event provisioned after the restart")
        assert rd.proc.poll() is None, rd.output()
    finally:
        rd.stop()
        await purge_queues(settings.amqp_url, QUEUE_STATUS)


def test_a_metrics_port_in_use_stops_the_resource_domain(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run([SECKILL, "resource-domain"], capture_output=True, text=True,
                              env=engine_env(settings, rd_metrics_port=taken.getsockname()[1]),
                              timeout=30)
    assert done.returncode == 2 and "rd_metrics_port: cannot listen" in done.stderr


def gpu_event(gpu: str = "A100") -> event_pb2.Event:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, instance_id=4242, user_id=9,
                           spec=event_pb2.InstanceSpec(cpus=8, memory_mb=32768, gpu=gpu,
                                                       image="ubuntu:22.04"))


def parse_documents(text: str) -> list[dict]:
    """The rendered file: `---`-separated documents, each JSON (a subset of YAML)."""
    assert text.startswith("---\n")
    return [json.loads(doc) for doc in text.split("---\n")[1:]]


async def test_rendered_manifests_for_a_gpu_instance(settings, tmp_path):
    provisioner = SimulatedProvisioner(settings.replace(
        rd_output_dir=str(tmp_path), rd_domain="gpu.test.internal", rd_delay_ms=0))
    outcome = await provisioner.provision(gpu_event())
    assert outcome.ok and outcome.endpoint == "https://4242.gpu.test.internal"
    deployment, service, ingress = parse_documents(Path(outcome.manifest).read_text())
    assert [d["kind"] for d in (deployment, service, ingress)] == [
        "Deployment", "Service", "Ingress"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ubuntu:22.04"
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32768Mi"},
        "limits": {"cpu": "8", "memory": "32768Mi", "nvidia.com/gpu": "1"}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [{"port": 80, "targetPort": 8888}]
    assert container["ports"] == [{"containerPort": 8888}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "4242.gpu.test.internal"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"number": 80}}
    assert all(d["metadata"]["labels"]["seckill/instance-id"] == "4242"
               for d in (deployment, service, ingress))


def test_manifests_without_a_gpu_ask_for_none():
    documents = manifests(gpu_event(gpu=""), "example.org")
    assert parse_documents(to_yaml(documents)) == documents
    pod = documents[0]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert documents[2]["spec"]["rules"][0]["host"] == "4242.example.org"


async def test_failed_units_go_back_to_the_sale(settings, product_id, tmp_path):
    await add_products(settings, [product_id])
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    gate = Gate(redis, keys)
    await gate.open_sale(product_id, 200, clear_buyers=True)
    rd_env = {"rd_output_dir": str(tmp_path), "rd_delay_ms": 5, "rd_failure_rate": 0.2,
              "rd_seed": 11}
    engine = EngineProcess(settings, workers=2)
    rd = ResourceDomainProcess(settings, **rd_env)
    try:
        assert await buy_all(gate, product_id, range(1, 201)) == 200

        async def all_final() -> bool:
            s = await statuses(settings, product_id)
            return s.get("RUNNING", 0) + s.get("FAILED", 0) == 200
        await wait_for(all_final, 120, "the first 200 orders final")
        failed = (await statuses(settings, product_id))["FAILED"]

        async def all_returned() -> bool:
            return int(await redis.get(keys.stock(product_id))) == failed
        await wait_for(all_returned, 30, "every failed unit returned")
        assert 20 <= failed <= 60
        # other users buy the returned units; nobody gets more than the stock
        assert await buy_all(gate, product_id, range(1001, 1001 + 3 * failed)) == failed
        assert int(await redis.get(keys.stock(product_id))) == 0
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            compensated = await conn.fetchval(
                "SELECT count(*) FROM seckill_logs WHERE product_id = $1 AND "
                "compensated_at IS NOT NULL", product_id)
        finally:
            await conn.close()
        assert compensated >= failed  # later failures among the re-sold units count too
    finally:
        rd.stop()
        engine.stop()
        await redis.aclose()
