"""How the reference Resource Domain turns an INSTANCE_CREATED event into an instance.

`Provisioner` is the pluggable step. The default, `SimulatedProvisioner`,
renders the Kubernetes objects an operator would apply (Deployment, Service,
Ingress) to a directory, waits a simulated delay and fails a configurable,
seeded share of instances. `KubectlProvisioner` applies the same manifests
to the cluster of the current kubeconfig; it is switched on with
`rd_provisioner = "kubectl"` where a cluster exists.

Manifests name users and instances, so they go to a directory only this user can
enter (created, or tightened, to mode 0700; by default under the user's state
directory, not a shared /tmp path), and kubectl reads them on standard input:
no second process is told a path to a file it could be raced for.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.config import Settings
from engine.errors import ConfigError, ServiceUnavailable
from engine.pb import event_pb2


class ProvisioningFailed(ServiceUnavailable):
    """The cluster refused a deletion: retried, like any outage of a service."""


@dataclass(frozen=True, slots=True)
class Provisioned:
    ok: bool
    endpoint: str = ""
    reason: str = ""
    manifest: str = ""


class Provisioner(Protocol):
    async def provision(self, event: event_pb2.Event) -> Provisioned: ...

    async def release(self, event: event_pb2.Event) -> None:
        """Delete the instance's objects; what is already gone is no error (a release is
        redelivered, or taken over from a Resource Domain that died halfway)."""


def manifests(event: event_pb2.Event, domain: str) -> list[dict[str, Any]]:
    """Deployment + Service + Ingress for one instance."""
    name = f"gpu-{event.instance_id}"
    labels = {"app": name, "seckill/instance-id": str(event.instance_id),
              "seckill/user-id": str(event.user_id)}
    resources = {"cpu": str(event.spec.cpus), "memory": f"{event.spec.memory_mb}Mi"}
    limits = dict(resources)
    pod: dict[str, Any] = {"containers": [{
        "name": "instance", "image": event.spec.image,
        "resources": {"requests": resources, "limits": limits},
        "ports": [{"containerPort": 8888}]}]}
    if event.spec.gpu:
        limits["nvidia.com/gpu"] = "1"
        pod["nodeSelector"] = {"nvidia.com/gpu.product": event.spec.gpu}
    host = f"{event.instance_id}.{domain}"
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name,
         "labels": labels}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
         "template": {"metadata": {"labels": labels}, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
         "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8888}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
         "metadata": {"name": name, "labels": labels},
         "spec": {"rules": [{"host": host, "http": {"paths": [{
             "path": "/", "pathType": "Prefix", "backend": {"service": {
                 "name": name, "port": {"number": 80}}}}]}}]}},
    ]


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """A multi-document YAML file; JSON is valid YAML, and needs no YAML library."""
    return "".join("---\n" + json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
                   for doc in documents)


def manifest_dir(configured: str) -> Path:
    """The manifest directory, made (or kept) private: mode 0700, owned by us."""
    if configured:
        path = Path(configured)
    else:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(state) / "seckill" / "manifests"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise ConfigError(f"rd_output_dir {path}: owned by another user; choose a directory "
                          "of this user's own")
    os.chmod(path, 0o700)
    return path


class SimulatedProvisioner:
    def __init__(self, settings: Settings) -> None:
        self.out = manifest_dir(settings.rd_output_dir)
        self.domain = settings.rd_domain
        self.delay = settings.rd_delay_ms / 1000
        self.failure_rate = settings.rd_failure_rate
        self.seed = settings.rd_seed if settings.rd_seed >= 0 else random.randrange(2**31)

    def fails(self, instance_id: int) -> bool:
        """Seeded per instance, so a retry of the same instance fails the same way."""
        return random.Random(self.seed * 1_000_003 + instance_id).random() < self.failure_rate

    async def render(self, event: event_pb2.Event) -> tuple[Path, str]:
        """The instance's manifest, written to the private directory (kept for operators)."""
        path = self.out / f"{event.instance_id}.yaml"
        text = to_yaml(manifests(event, self.domain))
        await asyncio.to_thread(_write_private, path, text)
        return path, text

    async def provision(self, event: event_pb2.Event) -> Provisioned:
        path, _ = await self.render(event)
        await asyncio.sleep(self.delay)
        if self.fails(event.instance_id):
            return Provisioned(False, reason="simulated failure: no GPU node could be "
                               "scheduled", manifest=str(path))
        return Provisioned(True, endpoint=f"https://{event.instance_id}.{self.domain}",
                           manifest=str(path))

    async def release(self, event: event_pb2.Event) -> None:
        """The simulated objects are the rendered manifest: deleting it deletes them."""
        path = self.out / f"{event.instance_id}.yaml"
        await asyncio.sleep(self.delay)
        await asyncio.to_thread(path.unlink, missing_ok=True)


class KubectlProvisioner(SimulatedProvisioner):
    """Applies the rendered manifests with `kubectl apply` (needs a reachable cluster)."""

    command = ("kubectl", "apply", "-f", "-")
    delete_command = ("kubectl", "delete", "--ignore-not-found", "-f", "-")

    async def provision(self, event: event_pb2.Event) -> Provisioned:
        path, text = await self.render(event)
        proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate(text.encode())
        if proc.returncode != 0:
            return Provisioned(False, reason=f"kubectl apply failed: {err.decode()[:200]}",
                               manifest=str(path))
        return Provisioned(True, endpoint=f"https://{event.instance_id}.{self.domain}",
                           manifest=str(path))

    async def release(self, event: event_pb2.Event) -> None:
        """`kubectl delete --ignore-not-found` of the instance's objects; a failure raises
        (the release stays claimed and unacknowledged, and is tried again)."""
        proc = await asyncio.create_subprocess_exec(
            *self.delete_command, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        # the same objects `provision` applied (the release event carries the spec too)
        _, err = await proc.communicate(to_yaml(manifests(event, self.domain)).encode())
        if proc.returncode != 0:
            raise ProvisioningFailed(f"kubectl delete failed: {err.decode()[:200]}")
        await asyncio.to_thread((self.out / f"{event.instance_id}.yaml").unlink,
                                missing_ok=True)

    def fails(self, instance_id: int) -> bool:
        return False  # the cluster decides


def make_provisioner(settings: Settings) -> Provisioner:
    if settings.rd_provisioner == "kubectl":
        return KubectlProvisioner(settings)
    return SimulatedProvisioner(settings)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
