"""Address arithmetic of private networks and the agent's checks of what it is sent."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from controller.agent.errors import InvalidSpec
from controller.agent.network import addressing
from controller.agent.rpc.convert import peer_from_pb
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.spec import Interface, MachineSpec, Ref, validate_spec

PREFIX = ipaddress.IPv6Network("fd12:3456:789a::/48")


def test_ipv6_follows_the_ipv4_as_zos_converts_it() -> None:
    """<prefix>:<third octet>::<fourth octet>, the /64 named by the third octet."""
    ip = ipaddress.IPv4Address("10.20.3.7")
    assert str(addressing.ipv6_of(PREFIX, ip)) == "fd12:3456:789a:3::7"
    subnet = ipaddress.IPv4Network("10.20.3.0/24")
    assert str(addressing.ipv6_subnet(PREFIX, subnet)) == "fd12:3456:789a:3::/64"
    assert addressing.ipv6_of(PREFIX, ip) in addressing.ipv6_subnet(PREFIX, subnet)
    # 255 in an octet is two hex digits, not one group of its own.
    assert str(addressing.ipv6_of(PREFIX, ipaddress.IPv4Address("10.20.255.254"))) == (
        "fd12:3456:789a:ff::fe"
    )


def test_derived_prefix_is_a_stable_ula_48_per_uid() -> None:
    uids = [f"0b4c5f0e-0000-4000-8000-{i:012d}" for i in range(300)]
    prefixes = {addressing.derived_ipv6_prefix(u) for u in uids}
    assert len(prefixes) == 300
    for p in prefixes:
        assert p.prefixlen == 48 and p.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert addressing.derived_ipv6_prefix(uids[0]) == addressing.derived_ipv6_prefix(uids[0])


def test_guest_addresses_skip_the_gateway() -> None:
    hosts = addressing.usable_hosts(ipaddress.IPv4Network("10.20.3.0/24"))
    assert str(hosts[0]) == "10.20.3.2" and str(hosts[-1]) == "10.20.3.254"
    assert len(hosts) == 253


def _spec(**nic: object) -> MachineSpec:
    base = {
        "network": "office", "network_id": "uid-1", "ip_range": "10.20.0.0/16",
        "subnet": "10.20.3.0/24", "ipv6_subnet": "fd12:3456:789a:3::/64", "listen_port": 51820,
    }  # fmt: skip
    base.update(nic)
    return MachineSpec(
        flist="file:///f.fl", cpu=1, memory_bytes=256 << 20,
        interfaces=(Interface(**base),),  # type: ignore[arg-type]
    )  # fmt: skip


REF = Ref("default", "m", "uid-m")


def test_a_well_formed_private_interface_passes() -> None:
    validate_spec(REF, _spec())
    validate_spec(REF, _spec(ip="10.20.3.7"))


@pytest.mark.parametrize(
    ("nic", "text"),
    [
        ({"ip": "10.20.4.7"}, "not a guest address of this node's subnet 10.20.3.0/24"),
        ({"ip": "10.20.3.1"}, "its .1 is the gateway"),
        ({"subnet": "10.21.3.0/24"}, "must be a /24 of 10.20.0.0/16"),
        ({"subnet": "10.20.0.0/23"}, "must be a /24"),
        ({"ipv6_subnet": "fd12::/48"}, "a /64"),
        ({"ip_range": "nonsense"}, "malformed"),
        ({"network_id": "../../etc"}, "network id"),
        ({"listen_port": 0}, "listen port 0"),
    ],
    ids=["ip-elsewhere", "gateway", "subnet-outside", "subnet-size", "v6-size", "range",
         "network-id", "port"],
)  # fmt: skip
def test_a_bad_private_interface_is_refused_naming_it(nic: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.network\.interfaces\[0\]") as err:
        validate_spec(REF, _spec(**nic))
    assert text in str(err.value)


KEY = base64.b64encode(bytes(32)).decode()


def test_peers_are_checked_before_they_reach_wireguard() -> None:
    good = pb.WireguardPeer(
        public_key=KEY, endpoint="192.0.2.12:51820", allowed_ips=["10.20.2.0/24"]
    )
    peer = peer_from_pb("net", good)
    assert (peer.endpoint, peer.allowed_ips) == ("192.0.2.12:51820", ("10.20.2.0/24",))
    v6 = pb.WireguardPeer(public_key=KEY, endpoint="[2001:db8::1]:51820")
    assert peer_from_pb("net", v6).endpoint == "[2001:db8::1]:51820"
    for bad, text in (
        (pb.WireguardPeer(public_key="short", endpoint="192.0.2.12:1"), "network net: peer"),
        (pb.WireguardPeer(public_key=KEY, endpoint="host.example:1"), "does not appear"),
        (pb.WireguardPeer(public_key=KEY, endpoint="192.0.2.12:70000"), "out of range"),
        (
            pb.WireguardPeer(
                public_key=KEY, endpoint="192.0.2.12:1", allowed_ips=["10.20.2.0/24\nx=1"]
            ),
            "does not appear",
        ),
    ):
        with pytest.raises(InvalidSpec, match="network net: peer") as err:
            peer_from_pb("net", bad)
        assert text in str(err.value), err.value
