"""Admission of Zmachine manifests by the real kube-apiserver, through kubectl as a user runs it."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from hack.controlplane import ControlPlane

Manifest = dict[str, Any]


def valid_manifest(name: str | None = None, namespace: str = "default") -> Manifest:
    return {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "Zmachine",
        "metadata": {"name": name or f"zm-{uuid.uuid4().hex[:8]}", "namespace": namespace},
        "spec": {
            "flist": "file:///srv/flists/ubuntu-24.04.fl",
            "computeCapacity": {"cpu": 2, "memory": "1Gi"},
        },
    }


def apply(cluster: ControlPlane, manifest: Manifest) -> tuple[int, str]:
    result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    return result.returncode, result.stdout + result.stderr


def test_minimal_manifest_is_accepted_and_defaulted(cluster: ControlPlane, ns: str) -> None:
    manifest = valid_manifest(namespace=ns)
    code, out = apply(cluster, manifest)
    assert code == 0, out
    got = json.loads(
        cluster.kubectl("get", "zm", "-n", ns, manifest["metadata"]["name"], "-o", "json").stdout
    )
    assert got["spec"]["restartPolicy"] == "Always"
    assert got["spec"]["paused"] is False
    assert got["spec"]["corex"] is False


def test_full_manifest_is_accepted(cluster: ControlPlane, ns: str) -> None:
    manifest = valid_manifest(namespace=ns)
    manifest["spec"].update(
        {
            "flist": "https://hub.example/acme/alpine.flist",
            "computeCapacity": {"cpu": 4, "memory": 4294967296},
            "size": "10Gi",
            "entrypoint": "/sbin/zinit init",
            "env": [
                {"name": "SSH_KEY", "value": "ssh-ed25519 AAAA test"},
                {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
            ],
            "volumes": [
                {"name": "data", "disk": {"size": "20Gi"}},
                {"name": "shared", "volume": {"size": "1Gi"}},
            ],
            "mounts": [
                {"name": "data", "mountPoint": "/var/lib/data"},
                {"name": "shared", "mountPoint": "/srv"},
            ],
            "network": {
                "interfaces": [{"network": "office", "ip": "10.20.2.5"}],
                "planetary": True,
                "mycelium": {"network": "office", "hexSeed": "0a1b2c3d4e5f"},
                "publicIP": True,
            },
            "gpu": ["0000:28:00.0/1002/731f"],
            "nodeSelector": {"zos.threefold.io/gpu": "true"},
            "restartPolicy": "OnFailure",
            "paused": True,
        }
    )
    code, out = apply(cluster, manifest)
    assert code == 0, out


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def mutate(m: Manifest) -> None:
        node = m["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _drop(path: str) -> Callable[[Manifest], None]:
    def mutate(m: Manifest) -> None:
        del m["spec"][path]

    return mutate


# (mutation, text kubectl must show, naming the field and the rule)
REJECTIONS: dict[str, tuple[Callable[[Manifest], object], list[str]]] = {
    "flist missing": (_drop("flist"), ["spec.flist", "Required value"]),
    "flist bad scheme": (_set("flist", "ftp://hub/x.fl"), ["spec.flist", "should match"]),
    "flist bad extension": (_set("flist", "https://hub/x.tar"), ["spec.flist", "should match"]),
    "compute missing": (_drop("computeCapacity"), ["spec.computeCapacity", "Required value"]),
    "cpu zero": (
        _set("computeCapacity.cpu", 0),
        ["spec.computeCapacity.cpu", "greater than or equal to 1"],
    ),
    "cpu too many": (
        _set("computeCapacity.cpu", 257),
        ["spec.computeCapacity.cpu", "less than or equal to 256"],
    ),
    "memory small": (
        _set("computeCapacity.memory", "200Mi"),
        ["spec.computeCapacity.memory", "memory must be at least 250Mi"],
    ),
    "memory small int": (_set("computeCapacity.memory", 1000), ["memory must be at least 250Mi"]),
    "memory garbage": (_set("computeCapacity.memory", "lots"), ["memory must be a quantity"]),
    "size below minimum": (_set("size", "100Mi"), ["spec.size", "minimum root size"]),
    "size below 2Gi for big machine": (
        lambda m: (_set("computeCapacity", {"cpu": 2, "memory": "4Gi"})(m), _set("size", "1Gi")(m)),
        ["spec.size", "2Gi when cpu x memory reaches 8Gi"],
    ),
    "env bad name": (
        _set("env", [{"name": "1BAD", "value": "x"}]),
        ["spec.env[0].name", "should match"],
    ),
    "env both value and valueFrom": (
        _set(
            "env",
            [{"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        ),
        ["exactly one of value and valueFrom"],
    ),
    "env duplicate": (
        _set("env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        ["spec.env[1]", "Duplicate value"],
    ),
    "volume with both kinds": (
        _set("volumes", [{"name": "v", "disk": {"size": "1Gi"}, "volume": {"size": "1Gi"}}]),
        ["either a disk or a volume"],
    ),
    "volume bad name": (
        _set("volumes", [{"name": "Bad_Name", "disk": {"size": "1Gi"}}]),
        ["spec.volumes[0].name"],
    ),
    "mount of unknown volume": (
        _set("mounts", [{"name": "ghost", "mountPoint": "/data"}]),
        ["spec.mounts", "every mount must name a volume listed in spec.volumes"],
    ),
    "mount at root": (
        lambda m: (
            _set("volumes", [{"name": "v", "volume": {"size": "1Gi"}}])(m),
            _set("mounts", [{"name": "v", "mountPoint": "/"}])(m),
        ),
        ["mountPoint must not be the root directory"],
    ),
    "mount relative": (
        lambda m: (
            _set("volumes", [{"name": "v", "volume": {"size": "1Gi"}}])(m),
            _set("mounts", [{"name": "v", "mountPoint": "data"}])(m),
        ),
        ["spec.mounts[0].mountPoint", "should match"],
    ),
    "reserved network": (
        _set("network", {"interfaces": [{"network": "ygg"}]}),
        ["network names ygg, pub, mycelium are reserved"],
    ),
    "bad ip": (
        _set("network", {"interfaces": [{"network": "office", "ip": "10.1.2"}]}),
        ["ip must be a valid IPv4 address"],
    ),
    "two interfaces": (
        _set("network", {"interfaces": [{"network": "a"}, {"network": "b"}]}),
        ["spec.network.interfaces", "must have at most 1 item"],
    ),
    "mycelium seed length": (
        _set("network", {"mycelium": {"network": "office", "hexSeed": "abcd"}}),
        ["spec.network.mycelium.hexSeed", "should match"],
    ),
    "mycelium seed all ones": (
        _set(
            "network",
            {
                "interfaces": [{"network": "office"}],
                "mycelium": {"network": "office", "hexSeed": "FFFFFFFFFFFF"},
            },
        ),
        ["spec.network.mycelium.hexSeed", "must not be all zeros or all ones"],
    ),
    "mycelium without its private interface": (
        _set(
            "network",
            {
                "interfaces": [{"network": "lab"}],
                "mycelium": {"network": "office", "hexSeed": "a1b2c3d4e5f6"},
            },
        ),
        ["spec.network.mycelium.network", "must be the network of a private interface"],
    ),
    "gpu id": (_set("gpu", ["28:00.0"]), ["spec.gpu[0]", "should match"]),
    "restart policy": (
        _set("restartPolicy", "Sometimes"),
        ["spec.restartPolicy", "Unsupported value", "Always"],
    ),
    "unknown field": (_set("cpus", 2), ['unknown field "spec.cpus"']),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_bad_manifest_is_rejected_with_a_readable_message(
    cluster: ControlPlane, ns: str, case: str
) -> None:
    mutate, expected = REJECTIONS[case]
    manifest = copy.deepcopy(valid_manifest(namespace=ns))
    mutate(manifest)
    code, out = apply(cluster, manifest)
    assert code != 0, f"{case}: accepted but should be rejected"
    for text in expected:
        assert text in out, f"{case}: {text!r} not in kubectl output:\n{out}"
    assert "Traceback" not in out


def test_nothing_is_stored_when_rejected(cluster: ControlPlane, ns: str) -> None:
    manifest = valid_manifest(namespace=ns)
    manifest["spec"]["computeCapacity"]["cpu"] = 0
    apply(cluster, manifest)
    got = cluster.kubectl("get", "zm", "-n", ns, manifest["metadata"]["name"], check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr


def test_explain_describes_fields(cluster: ControlPlane, ns: str) -> None:
    out = cluster.kubectl("explain", "zmachine.spec.computeCapacity.memory").stdout
    assert "at least 250Mi" in out
    out = cluster.kubectl("explain", "zm.spec.restartPolicy").stdout
    assert "Always, OnFailure or Never" in out


def test_short_name_and_printer_columns(cluster: ControlPlane, ns: str) -> None:
    manifest = valid_manifest(namespace=ns)
    assert apply(cluster, manifest)[0] == 0
    header = cluster.kubectl("get", "zm", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "NODE", "MODE", "IP", "AGE"]
    wide = cluster.kubectl("get", "zm", "-n", ns, "-o", "wide").stdout.splitlines()[0].split()
    assert wide[-5:] == ["IPV6", "PUBLIC", "PUBLIC-IPV6", "PLANETARY", "MYCELIUM"]
