"""The Resource Domain's Kubernetes objects against Kubernetes' own API schemas (issue 23,
item 6): what it applies for an instance, and what a release deletes (the same objects),
validated strictly (no unknown field) with kubernetes-validate, for the newest Kubernetes
version the installed package knows. A manifest broken on purpose must fail."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import kubernetes_validate
import pytest

from engine.pb import event_pb2
from engine.resource_domain.provisioning import KubectlProvisioner, manifests

VERSION = kubernetes_validate.latest_version()


def event(gpu: str) -> event_pb2.Event:
    return event_pb2.Event(event_type=event_pb2.INSTANCE_RELEASED, instance_id=4242, user_id=9,
                           name="A100 x1", product_id=7, stream_id="1-1",
                           spec=event_pb2.InstanceSpec(cpus=8, memory_mb=32768, gpu=gpu,
                                                       image="ubuntu:22.04"))


def validate(document: dict[str, Any]) -> str:
    return kubernetes_validate.validate(document, VERSION, strict=True)


def test_the_version_is_a_current_kubernetes():
    major, minor = (int(x) for x in VERSION.split(".")[:2])
    assert (major, minor) >= (1, 31)


@pytest.mark.parametrize("gpu", ["A100", ""])
def test_every_object_of_an_instance_validates(gpu):
    documents = manifests(event(gpu), "gpu.example.internal")
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "Ingress"]
    for document in documents:
        validate(document)  # raises ValidationError, naming the field


async def test_what_a_release_deletes_is_what_was_applied_and_validates(settings, tmp_path,
                                                                        monkeypatch):
    """KubectlProvisioner pipes the same objects to `kubectl delete` (a stand-in kubectl
    on PATH keeps what it was given)."""
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/argv\ncat >> {tmp_path}/stdin\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    kubectl = KubectlProvisioner(settings.replace(rd_output_dir=str(tmp_path / "out"),
                                                  rd_domain="x.example", rd_delay_ms=0))
    assert (await kubectl.provision(event("A100"))).ok
    applied = (tmp_path / "stdin").read_text()
    (tmp_path / "stdin").unlink()
    await kubectl.release(event("A100"))
    deleted = (tmp_path / "stdin").read_text()
    assert (tmp_path / "argv").read_text().splitlines() == [
        "apply -f -", "delete --ignore-not-found -f -"]
    assert deleted == applied
    documents = [json.loads(d) for d in deleted.split("---\n")[1:]]
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "Ingress"]
    for document in documents:
        validate(document)
    assert not (tmp_path / "out" / "4242.yaml").exists()


def broken(kind: str) -> dict[str, Any]:
    documents = {d["kind"]: d for d in copy.deepcopy(manifests(event("A100"), "x.example"))}
    return documents[kind]


@pytest.mark.parametrize(("kind", "breakage", "message"), [
    ("Deployment", lambda d: d["spec"].__setitem__("replicas", "one"), "is not of type"),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
     "'name' is a required property"),
    ("Service", lambda d: d["spec"]["ports"][0].__setitem__("prot", 80),
     "Additional properties are not allowed"),
    ("Ingress", lambda d: d["spec"]["rules"][0]["http"]["paths"][0].pop("pathType"),
     "'pathType' is a required property"),
])
def test_a_broken_manifest_fails_validation(kind, breakage, message):
    document = broken(kind)
    breakage(document)
    with pytest.raises(kubernetes_validate.ValidationError) as failed:
        validate(document)
    assert message in failed.value.message
