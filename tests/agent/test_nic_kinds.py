"""The public and planetary NICs' pieces without a VM: zos's MAC derivation, which NIC
gets the default routes, the planetary address, the agent's checks of what it is sent,
and the refusals on a node without a public interface or a Yggdrasil router."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

import pytest

from controller.agent.errors import FailedPrecondition, InvalidSpec
from controller.agent.guest.boot import seed_interfaces
from controller.agent.network import local
from controller.agent.network.public import PublicBridge
from controller.agent.network.yggdrasil import Planetary, guest_address
from controller.agent.runtime.state import MachineRecord, NicStatus
from controller.agent.spec import (
    Interface,
    MachineSpec,
    PublicInterface,
    Ref,
    validate_planetary_peer,
    validate_spec,
)

PUB = PublicInterface("203.0.113.10/24", "203.0.113.1", "2001:db8:1::10/64", "2001:db8:1::1")
PRIVATE = Interface(
    "office", "10.20.1.5", "net-uid", "10.20.0.0/16", "10.20.1.0/24", "fd00:0:0:1::/64",
    listen_port=51820,
)  # fmt: skip
REF = Ref("default", "m", "uid-m")


def test_zos_mac_is_md5_of_the_name_made_local_unicast() -> None:
    digest = hashlib.md5(b"zmabcdef0123p0").digest()
    mac = local.zos_mac("zmabcdef0123p0")
    first = (digest[0] | 2) & 0xFE
    if local._zos_mac_valid(bytes([first, *digest[1:6]])):  # the common case: offset 0
        assert mac == ":".join(f"{b:02x}" for b in (first, *digest[1:6]))
    assert mac == local.zos_mac("zmabcdef0123p0")
    octets = bytes.fromhex(mac.replace(":", ""))
    assert octets[0] & 2 and not octets[0] & 1 and local._zos_mac_valid(octets)


def test_zos_mac_slides_past_the_reserved_ranges() -> None:
    """Names whose first six digest bytes fall in a reserved range get a later slice."""
    slid = 0
    for i in range(3000):
        name = f"tap{i}"
        digest = hashlib.md5(name.encode()).digest()
        first = bytes([(digest[0] | 2) & 0xFE, *digest[1:6]])
        mac = bytes.fromhex(local.zos_mac(name).replace(":", ""))
        assert local._zos_mac_valid(mac)
        if not local._zos_mac_valid(first):
            slid += 1
            assert mac != first and mac[1:] in digest
    assert slid > 0  # the check above ran


def _record(spec: MachineSpec, nics: list[NicStatus]) -> MachineRecord:
    return MachineRecord(ref=REF, generation=1, spec=spec, nics=nics)


def test_the_public_nic_takes_the_default_routes_of_its_families() -> None:
    allocator = local.IPAllocator("10.231.0.0/24", Path("/nonexistent"))
    private = NicStatus("office", "10.20.1.5", "02:00:00:00:00:01", "t0", "fd00:0:0:1::5")
    public = NicStatus("pub", "203.0.113.10", "02:00:00:00:00:02", "p0", "2001:db8:1::10")
    spec = MachineSpec("file:///x.fl", 1, 256 << 20, interfaces=(PRIVATE,), public=PUB)
    priv, pub = seed_interfaces(_record(spec, [private, public]), allocator)
    assert (priv.gateway4, priv.gateway6) == (None, None)
    assert [r.to for r in priv.routes] == ["10.20.0.0/16", "100.64.0.0/16"]  # kept
    assert (pub.mac, list(pub.addresses)) == (public.mac, [PUB.ipv4, PUB.ipv6])
    assert (pub.gateway4, pub.gateway6) == ("203.0.113.1", "2001:db8:1::1")
    # IPv4 only: IPv6's default stays with the private network, as in zos.
    only4 = PublicInterface("203.0.113.10/24", "203.0.113.1")
    spec = MachineSpec("file:///x.fl", 1, 256 << 20, interfaces=(PRIVATE,), public=only4)
    priv, pub = seed_interfaces(_record(spec, [private, public]), allocator)
    assert (priv.gateway4, priv.gateway6) == (None, "fd00:0:0:1::1")
    assert (list(pub.addresses), pub.gateway6) == ([only4.ipv4], None)


@pytest.mark.parametrize(
    "public, text",
    [
        (PublicInterface(), "neither an IPv4 nor an IPv6"),
        (PublicInterface("203.0.113.10", "203.0.113.1"), "not an IPv4 address with a prefix"),
        (PublicInterface("203.0.113.10/24", "198.51.100.1"), "needs a gateway of its own"),
        (PublicInterface("203.0.113.10/24", "203.0.113.10"), "needs a gateway of its own"),
        (PublicInterface("", "", "2001:db8:1::10/64", "nope"), "IPv6 '2001:db8:1::10/64' via"),
        (PublicInterface("2001:db8:1::10/64", "2001:db8:1::1"), "not an IPv4 address"),
    ],
    ids=["empty", "no-prefix", "gw-outside", "gw-is-guest", "gw-not-ip", "wrong-family"],
)
def test_bad_public_addresses_are_refused_naming_the_field(
    public: PublicInterface, text: str
) -> None:
    spec = MachineSpec("file:///x.fl", 1, 256 << 20, public=public)
    with pytest.raises(InvalidSpec) as err:
        validate_spec(REF, spec)
    assert "zmachine default/m: spec.network.publicIP" in str(err.value)
    assert text in str(err.value)


def test_a_node_without_public_interface_refuses_the_nic() -> None:
    for interface in (None, "no-such-link-zz"):
        bridge = PublicBridge(None, interface)
        assert bridge.available() == ""
        with pytest.raises(FailedPrecondition, match="has no public interface"):
            bridge.attach("zmtap", "zmachine default/m")


def test_planetary_guest_address_is_the_nodes_64_and_the_mac() -> None:
    subnet = ipaddress.IPv6Network("300:42a0:fe23:fe95::/64")
    mac = local.zos_mac("ygg:zm0aecc89128y0")
    address = guest_address(subnet, mac)
    assert address in subnet and address != subnet.network_address + 1
    assert int(address) & (2**48 - 1) == int(mac.replace(":", ""), 16)


@pytest.mark.parametrize(
    "uri, ok",
    [
        ("tls://192.0.2.12:9943", True),
        ("tls://[2001:db8::1]:9943", True),
        ("tcp://192.0.2.12:9943", False),
        ("tls://node-b:9943", False),
        ("tls://192.0.2.12", False),
        ("tls://192.0.2.12:9943/x", False),
        ("tls://192.0.2.12:99999", False),
    ],
)
def test_planetary_peers_must_be_tls_to_an_ip_and_port(uri: str, ok: bool) -> None:
    if ok:
        validate_planetary_peer("peers[0]", uri)
    else:
        with pytest.raises(InvalidSpec, match=r"peers\[0\]"):
            validate_planetary_peer("peers[0]", uri)


def test_a_node_without_yggdrasil_refuses_the_nic(tmp_path: Path) -> None:
    for binary, underlay in ((None, "192.0.2.11"), (Path("/usr/sbin/yggdrasil"), "")):
        router = Planetary(None, tmp_path, binary, underlay)
        assert router.peer_uri() == ""
        with pytest.raises(FailedPrecondition, match="has no Yggdrasil router"):
            router.attach("zmtap", "zmachine default/m")


def test_the_planetary_nic_comes_last_with_its_route() -> None:
    allocator = local.IPAllocator("10.231.0.0/24", Path("/nonexistent"))
    public = NicStatus("pub", "203.0.113.10", "02:00:00:00:00:02", "p0", "2001:db8:1::10")
    ygg = NicStatus("ygg", "", "02:00:00:00:00:03", "y0", "300:1:2:3:0:200:0:3")
    spec = MachineSpec("file:///x.fl", 1, 256 << 20, public=PUB, planetary=True)
    pub, planetary = seed_interfaces(_record(spec, [public, ygg]), allocator)
    assert pub.gateway6 == "2001:db8:1::1"  # the default stays with the public NIC
    assert (planetary.mac, list(planetary.addresses)) == (ygg.mac, ["300:1:2:3:0:200:0:3/64"])
    assert (planetary.gateway4, planetary.gateway6) == (None, None)
    assert [(r.to, r.via) for r in planetary.routes] == [("200::/7", "300:1:2:3::1")]
