"""The ZmachineNetwork custom resource: a private network spanning nodes, as a zos network.

Each node that hosts one of its Zmachines gets a /24 of the range (recorded in the status
when the controller places the first one there); the subnet's .1 is the node's gateway.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from controller.api.base import KubeModel, list_map, rule, validations
from controller.api.zmachine import Conditions

KIND = "ZmachineNetwork"
PLURAL = "zmachinenetworks"

# Every node's share of the range, as in zos.
NODE_PREFIX = 24
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
ULA = "fc00::/7"

_IS_V4 = "isCIDR(self) && cidr(self).ip().family() == 4"
_IS_V6 = "isCIDR(self) && cidr(self).ip().family() == 6"


class ZmachineNetworkSpec(KubeModel):
    """A private IPv4 range (and its IPv6 twin) shared by the network's Zmachines."""

    ip_range: Annotated[
        str,
        Field(
            alias="ipRange",
            max_length=18,
            json_schema_extra=validations(
                rule(_IS_V4, "ipRange must be an IPv4 CIDR such as 10.20.0.0/16"),
                rule(
                    f"!({_IS_V4}) || (cidr(self).prefixLength() >= 16 && "
                    f"cidr(self).prefixLength() <= {NODE_PREFIX})",
                    f"ipRange must be a /16 to a /{NODE_PREFIX}: each node takes a "
                    f"/{NODE_PREFIX} of it, whose third octet names its IPv6 /64",
                ),
                rule(
                    f"!({_IS_V4}) || cidr(self).masked() == cidr(self)",
                    "ipRange must have no host bits set (for example 10.20.0.0/16)",
                ),
                rule(
                    f"!({_IS_V4}) || ["
                    + ", ".join(f"cidr('{r}')" for r in PRIVATE_RANGES)
                    + "].exists(c, c.containsCIDR(cidr(self)))",
                    f"ipRange must be inside a private range ({', '.join(PRIVATE_RANGES)})",
                ),
                rule("self == oldSelf", "ipRange is immutable"),
            ),
        ),
    ]
    """IPv4 range of the network, a /16 to a /24 inside 10/8, 172.16/12 or 192.168/16.
    Immutable."""
    ipv6_prefix: Annotated[
        str | None,
        Field(
            alias="ipv6Prefix",
            max_length=43,
            json_schema_extra=validations(
                rule(
                    f"{_IS_V6} && cidr(self).prefixLength() == 48 && "
                    f"cidr(self).masked() == cidr(self) && cidr('{ULA}').containsCIDR(cidr(self))",
                    "ipv6Prefix must be a unique local /48 (fc00::/7) with no host bits, "
                    "such as fd12:3456:789a::/48",
                ),
                rule("self == oldSelf", "ipv6Prefix is immutable"),
            ),
        ),
    ] = None
    """Unique local IPv6 /48 of the network. Derived from the network's uid when absent
    (status.ipv6Prefix); each node's /24 a.b.c.0 maps to the /64 <prefix>:<c>::, and the
    host a.b.c.d to <prefix>:<c>::<d>, as zos derives them. Immutable."""
    nat: bool = False
    """Masquerade the guests' traffic to destinations outside the network behind the node's
    uplink address (egress only)."""


class NodeSubnet(KubeModel):
    """The part of the network one node serves."""

    node: str
    """Name of the ZmachineNode."""
    subnet: str
    """IPv4 /24 of the range; its .1 is the guests' gateway on that node."""
    ipv6_subnet: Annotated[str, Field(alias="ipv6Subnet")]
    """IPv6 /64 matching the IPv4 subnet."""
    listen_port: Annotated[int, Field(alias="listenPort", ge=1, le=65535)]
    """UDP port of the node's end of the network's overlay."""


class ZmachineNetworkStatus(KubeModel):
    """Where the network is deployed."""

    ipv6_prefix: Annotated[str | None, Field(alias="ipv6Prefix")] = None
    """The IPv6 /48 in use: spec.ipv6Prefix, or the one derived from the uid."""
    subnets: Annotated[list[NodeSubnet], Field(json_schema_extra=list_map("node"))] = []
    """One /24 per node hosting a Zmachine of the network, assigned at placement."""
    machines: int = 0
    """Zmachines of the namespace that use the network."""
    conditions: Conditions = []
    """InUse: Zmachines still use the network (deletion waits for them)."""
