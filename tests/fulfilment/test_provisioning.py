"""The Resource Domain's manifests: a private directory, private files, and kubectl
fed on standard input (a stand-in kubectl on PATH records what it was given)."""

from __future__ import annotations

import json
import os
import stat

from engine.config import Settings
from engine.pb import event_pb2
from engine.resource_domain.provisioning import KubectlProvisioner, SimulatedProvisioner


def event(instance_id: int = 42) -> event_pb2.Event:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_CREATED, instance_id=instance_id,
                           user_id=7, spec=event_pb2.InstanceSpec(cpus=2, memory_mb=1024,
                                                                  image="ubuntu:22.04"))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_manifests_go_to_a_private_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    provisioner = SimulatedProvisioner(Settings(rd_output_dir=str(shared), rd_delay_ms=0))
    assert mode(shared) == 0o700  # an existing directory is tightened
    done = await provisioner.provision(event())
    assert done.ok and mode(done.manifest) == 0o600
    fresh = tmp_path / "a" / "b"
    SimulatedProvisioner(Settings(rd_output_dir=str(fresh), rd_delay_ms=0))
    assert mode(fresh) == 0o700


async def test_default_directory_is_the_users_state_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    provisioner = SimulatedProvisioner(Settings(rd_delay_ms=0))
    assert provisioner.out == tmp_path / "state" / "seckill" / "manifests"
    assert mode(provisioner.out) == 0o700


async def test_kubectl_reads_the_manifest_on_stdin(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record.json"
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"""#!/usr/bin/env python3
import json, sys
json.dump({{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}, open({str(record)!r}, "w"))
""")
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    provisioner = KubectlProvisioner(Settings(rd_output_dir=str(tmp_path / "m"),
                                              rd_delay_ms=0, rd_domain="gpu.test"))
    done = await provisioner.provision(event(43))
    seen = json.loads(record.read_text())
    assert done.ok and done.endpoint == "https://43.gpu.test"
    assert seen["argv"] == ["apply", "-f", "-"]
    with open(done.manifest) as f:
        assert seen["stdin"] == f.read() and '"gpu-43"' in seen["stdin"]
