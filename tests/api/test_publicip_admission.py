"""Admission of ZmachinePublicIPPools by the real kube-apiserver (CEL rules generated from
controller/api/zmachinepublicippool.py), and the Zmachine's public printer columns."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest

from hack.controlplane import ControlPlane
from tests.api.test_admission import apply

V4 = {"subnet": "203.0.113.0/24", "gateway": "203.0.113.1", "addresses": ["203.0.113.10"]}
V6 = {"subnet": "2001:db8:1::/64", "gateway": "2001:db8:1::1", "addresses": ["2001:db8:1::10"]}


def pool(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "ZmachinePublicIPPool",
        "metadata": {"name": f"adm-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }


def test_pool_is_accepted_with_its_columns(cluster: ControlPlane) -> None:
    manifest = pool(ipv4=V4, ipv6=V6)
    code, out = apply(cluster, manifest)
    assert code == 0, out
    name = manifest["metadata"]["name"]
    try:
        header, row = cluster.kubectl("get", "zmpool", name).stdout.splitlines()
        assert header.split() == ["NAME", "IPV4", "IPV6", "FREE", "AGE"]
        assert row.split()[1:3] == ["203.0.113.0/24", "2001:db8:1::/64"]
        for only in ({"ipv4": V4}, {"ipv6": V6}):
            one = pool(**only)
            code, out = apply(cluster, one)
            assert code == 0, out
            cluster.kubectl("delete", "zmpool", one["metadata"]["name"])
    finally:
        cluster.kubectl("delete", "zmpool", name)


def _with(family: str, base: dict[str, Any], **change: Any) -> dict[str, Any]:
    return {family: {**copy.deepcopy(base), **change}}


POOL_REJECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "empty": ({}, "a pool needs ipv4, ipv6 or both"),
    "v4 subnet is v6": (_with("ipv4", V4, subnet="2001:db8::/64"), "subnet must be an IPv4 CIDR"),
    "v6 subnet is v4": (_with("ipv6", V6, subnet="198.51.100.0/24"), "must be an IPv6 CIDR"),
    "gateway outside": (
        _with("ipv4", V4, gateway="198.51.100.1"),
        "gateway must be an address inside subnet",
    ),
    "address outside": (
        _with("ipv4", V4, addresses=["198.51.100.7"]),
        "addresses must be IPv4 addresses inside",
    ),
    "address is gateway": (_with("ipv4", V4, addresses=["203.0.113.1"]), "other than the gateway"),
    "address not ip": (_with("ipv6", V6, addresses=["nope"]), "addresses must be IPv6 addresses"),
    "no addresses": (_with("ipv4", V4, addresses=[]), "spec.ipv4.addresses"),
    "duplicate address": (
        _with("ipv4", V4, addresses=["203.0.113.10", "203.0.113.10"]),
        "Duplicate value",
    ),
}


@pytest.mark.parametrize("case", sorted(POOL_REJECTIONS))
def test_bad_pool_is_rejected(cluster: ControlPlane, case: str) -> None:
    spec, expected = POOL_REJECTIONS[case]
    code, out = apply(cluster, pool(**spec))
    assert code != 0, f"{case}: accepted"
    assert expected in out, out


def test_zmachine_columns_include_public_addresses(cluster: ControlPlane, ns: str) -> None:
    crd = json.loads(
        cluster.kubectl("get", "crd", "zmachines.zos.threefold.io", "-o", "json").stdout
    )
    columns = {
        c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert columns["Public"] == ".status.publicIP"
    assert columns["Public-IPv6"] == ".status.publicIPv6"
