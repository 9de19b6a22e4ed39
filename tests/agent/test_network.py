"""Taps in a network namespace of the test's own, and the node-local IP allocator."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from controller.agent.errors import ResourceExhausted
from controller.agent.network.local import (
    IPAllocator,
    NetworkError,
    create_tap,
    delete_tap,
    link_exists,
    mac_address,
    tap_name,
)


def link(netns: str, name: str) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-d", "link", "show", "dev", name],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    info: dict[str, object] = json.loads(out)[0]
    return info


def test_tap_names_and_macs_are_stable_short_and_distinct() -> None:
    uids = [f"6f1c2e7a-0000-4000-8000-{i:012d}" for i in range(200)]
    names = {tap_name(u, i) for u in uids for i in range(3)}
    assert len(names) == 600
    assert all(len(n) <= 15 and n.startswith("zm") for n in names)
    assert tap_name(uids[0], 1) == tap_name(uids[0], 1)
    macs = {mac_address(u, i) for u in uids for i in range(3)}
    assert len(macs) == 600
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert mac_address(uids[0], 0) == mac_address(uids[0], 0)


def test_tap_joins_the_bridge_in_the_namespace_and_is_removed(
    guest_netns: tuple[str, str, str],
) -> None:
    netns, bridge, _ = guest_netns
    name = tap_name("test-network-uid", 0)
    create_tap(name, bridge, netns)
    try:
        info = link(netns, name)
        assert info["master"] == bridge
        assert "UP" in info["flags"]  # type: ignore[operator]
        assert info["linkinfo"]["info_kind"] == "tun"  # type: ignore[index]
        assert not link_exists(name)  # nothing in the host namespace
        create_tap(name, bridge, netns)  # again: kept as is
        assert link(netns, name)["ifindex"] == info["ifindex"]
    finally:
        delete_tap(name, netns)
    assert not link_exists(name, netns)
    delete_tap(name, netns)  # already gone: not an error


def test_tap_on_a_missing_bridge_names_it(guest_netns: tuple[str, str, str]) -> None:
    with pytest.raises(NetworkError, match="bridge nosuchbr does not exist"):
        create_tap(tap_name("x", 0), "nosuchbr", guest_netns[0])


def test_allocator_hands_out_distinct_persistent_addresses(tmp_path: Path) -> None:
    state = tmp_path / "ipam.json"
    ipam = IPAllocator("10.240.0.0/29", state)
    assert ipam.gateway == ipaddress.IPv4Address("10.240.0.1")
    got = [ipam.allocate(f"vm{i}") for i in range(5)]
    assert [str(a) for a in got] == [f"10.240.0.{i}" for i in range(2, 7)]
    assert ipam.allocate("vm0") == got[0]  # idempotent per owner
    with pytest.raises(ResourceExhausted, match=r"no free address left in 10\.240\.0\.0/29"):
        ipam.allocate("vm5")
    again = IPAllocator("10.240.0.0/29", state)  # a restarted agent reads the same table
    assert again.lookup("vm3") == got[3]
    again.release("vm3")
    assert ipam.allocate("vm5") == got[3]
    assert str(ipam.interface(got[0])) == "10.240.0.2/29"


def test_allocator_reserves_spec_given_addresses(tmp_path: Path) -> None:
    ipam = IPAllocator("10.240.1.0/24", tmp_path / "ipam.json")
    ipam.reserve("static", "10.240.1.2")
    assert ipam.allocate("dynamic") == ipaddress.IPv4Address("10.240.1.3")
    with pytest.raises(ResourceExhausted, match="already used by static"):
        ipam.reserve("other", "10.240.1.2")
    for bad in ("10.240.1.1", "10.9.9.9"):
        with pytest.raises(ValueError, match="not a usable host"):
            ipam.reserve("other", bad)
