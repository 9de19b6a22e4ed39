"""Address arithmetic of private networks, shared by the controller and the agents.

zos gives each node a /24 of the network's IPv4 range and derives every IPv6 address from
the IPv4 one: the network's unique local /48, the third octet as the /64, the fourth as the
host (``Convert4to6``). zos takes the /48 from the network id's bytes; we take it from the
md5 of the network's uid (what zos's code meant: its md5 call hashes nothing) and print
every group zero-padded, so that the prefix always is a valid fd00::/8 address.
"""

from __future__ import annotations

import hashlib
import ipaddress

V4Net = ipaddress.IPv4Network
V6Net = ipaddress.IPv6Network

# Routed via the subnet's .1 besides the range, as zos does (its WireGuard access range).
ACCESS_RANGE = V4Net("100.64.0.0/16")


def derived_ipv6_prefix(network_uid: str) -> V6Net:
    digest = hashlib.md5(network_uid.encode(), usedforsecurity=False).digest()
    b = digest[:5]
    return V6Net(f"fd{b[0]:02x}:{b[1]:02x}{b[2]:02x}:{b[3]:02x}{b[4]:02x}::/48")


def ipv6_subnet(prefix: V6Net, subnet: V4Net) -> V6Net:
    """The /64 of a node's /24: the /48 with the third octet as the subnet id."""
    third = subnet.network_address.packed[2]
    return V6Net((int(prefix.network_address) | (third << 64), 64))


def ipv6_of(prefix: V6Net, ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    octets = ip.packed
    return ipaddress.IPv6Address(int(prefix.network_address) | (octets[2] << 64) | octets[3])


def gateway(subnet: V4Net) -> ipaddress.IPv4Address:
    return subnet.network_address + 1


def usable_hosts(subnet: V4Net) -> list[ipaddress.IPv4Address]:
    """Guest addresses of a node's subnet: every host but the gateway."""
    return [h for h in subnet.hosts() if h != gateway(subnet)]
