"""Admission of ZmachineNetworks, and of the network fields of Zmachines, by the real
kube-apiserver (CEL rules generated from controller/api/zmachinenetwork.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from hack.controlplane import ControlPlane
from tests.api.test_admission import apply, valid_manifest


def network(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "ZmachineNetwork",
        "metadata": {"name": f"net-{uuid.uuid4().hex[:8]}", "namespace": namespace},
        "spec": {"ipRange": "10.20.0.0/16", **spec},
    }


def test_network_is_accepted_and_defaulted(cluster: ControlPlane, ns: str) -> None:
    manifest = network(ns, ipv6Prefix="fd12:3456:789a::/48")
    code, out = apply(cluster, manifest)
    assert code == 0, out
    name = manifest["metadata"]["name"]
    got = json.loads(cluster.kubectl("get", "zmnet", "-n", ns, name, "-o", "json").stdout)
    assert got["spec"]["nat"] is False
    header = cluster.kubectl("get", "zmnet", "-n", ns).stdout.splitlines()[0].split()
    assert header == ["NAME", "RANGE", "IPV6", "NAT", "MACHINES", "AGE"]


NETWORK_REJECTIONS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "range missing": ({"ipRange": None}, ["spec.ipRange", "Required value"]),
    "range not a cidr": ({"ipRange": "10.20.0.0"}, ["ipRange must be an IPv4 CIDR"]),
    "range ipv6": ({"ipRange": "fd00::/16"}, ["ipRange must be an IPv4 CIDR"]),
    "range too big": ({"ipRange": "10.0.0.0/8"}, ["ipRange must be a /16 to a /24"]),
    "range too small": ({"ipRange": "10.20.0.0/25"}, ["ipRange must be a /16 to a /24"]),
    "range host bits": ({"ipRange": "10.20.1.0/16"}, ["no host bits set"]),
    "range public": ({"ipRange": "8.8.0.0/16"}, ["ipRange must be inside a private range"]),
    "prefix not ula": ({"ipv6Prefix": "2001:db8::/48"}, ["ipv6Prefix must be a unique local /48"]),
    "prefix length": ({"ipv6Prefix": "fd00::/64"}, ["ipv6Prefix must be a unique local /48"]),
    "unknown field": ({"mtu": 1400}, ['unknown field "spec.mtu"']),
}


@pytest.mark.parametrize("case", sorted(NETWORK_REJECTIONS))
def test_bad_network_is_rejected(cluster: ControlPlane, ns: str, case: str) -> None:
    change, expected = NETWORK_REJECTIONS[case]
    manifest = network(ns)
    for key, value in change.items():
        if value is None:
            del manifest["spec"][key]
        else:
            manifest["spec"][key] = value
    code, out = apply(cluster, manifest)
    assert code != 0, f"{case}: accepted"
    for text in expected:
        assert text in out, f"{case}: {text!r} not in:\n{out}"


def test_range_and_prefix_are_immutable(cluster: ControlPlane, ns: str) -> None:
    manifest = network(ns, ipv6Prefix="fd12:3456:789a::/48")
    assert apply(cluster, manifest)[0] == 0
    for key, value, text in (
        ("ipRange", "10.21.0.0/16", "ipRange is immutable"),
        ("ipv6Prefix", "fd12:3456:789b::/48", "ipv6Prefix is immutable"),
    ):
        changed = json.loads(json.dumps(manifest))
        changed["spec"][key] = value
        code, out = apply(cluster, changed)
        assert code != 0 and text in out, out
    manifest["spec"]["nat"] = True  # options other than the addresses may change
    assert apply(cluster, manifest)[0] == 0


@pytest.mark.parametrize(
    ("interfaces", "text"),
    [
        ([{"network": "ygg"}], "network names ygg, pub, mycelium are reserved"),
        ([{"network": "pub"}], "network names ygg, pub, mycelium are reserved"),
        ([{"network": "mycelium"}], "network names ygg, pub, mycelium are reserved"),
        ([{"network": "a"}, {"network": "b"}], "must have at most 1 item"),
        ([{"network": "office", "ip": "10.20.3.1"}], "ip must not end in .0, .1"),
        ([{"network": "office", "ip": "10.20.3.0"}], "ip must not end in .0, .1"),
        ([{"network": "office", "ip": "10.20.3.255"}], "ip must not end in .0, .1"),
        ([{"network": "office", "ip": "fd00::5"}], "ip must be a valid IPv4 address"),
    ],
    ids=["ygg", "pub", "mycelium", "two-private", "dot-one", "dot-zero", "broadcast", "ipv6"],
)
def test_zmachine_interface_rules(
    cluster: ControlPlane, ns: str, interfaces: list[dict[str, str]], text: str
) -> None:
    manifest = valid_manifest(namespace=ns)
    manifest["spec"]["network"] = {"interfaces": interfaces}
    code, out = apply(cluster, manifest)
    assert code != 0 and text in out, out


def test_zmachine_ip_ending_in_one_digit_after_dot_one_is_fine(
    cluster: ControlPlane, ns: str
) -> None:
    """.10 and .100 end with "1" and "0" but not with ".1" or ".0"."""
    for ip in ("10.20.3.10", "10.20.3.100", "10.20.3.11"):
        manifest = valid_manifest(namespace=ns)
        manifest["spec"]["network"] = {"interfaces": [{"network": "office", "ip": ip}]}
        code, out = apply(cluster, manifest)
        assert code == 0, out
