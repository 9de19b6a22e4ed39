"""The ZmachinePublicIPPool custom resource: public addresses the cluster may hand out.

A Zmachine with ``spec.network.publicIP: true`` takes one address of each family a pool
has (as a zos ``ip`` workload gives its machine), on a NIC bridged to its node's public
interface, with the default route through the pool's gateway. The controller allocates
under its placement lock and records each holder in the pool's status; an address has at
most one holder and returns to the pool when its Zmachine is deleted.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from controller.api.base import KubeModel, list_map, rule, validations

KIND = "ZmachinePublicIPPool"
PLURAL = "zmachinepublicippools"


def _family_rules(v: int, example: str) -> dict[str, Any]:
    is_cidr = f"isCIDR(self.subnet) && cidr(self.subnet).ip().family() == {v}"
    return validations(
        rule(is_cidr, f"subnet must be an IPv{v} CIDR such as {example}", ".subnet"),
        rule(
            f"!({is_cidr}) || (isIP(self.gateway) && cidr(self.subnet).containsIP(self.gateway))",
            "gateway must be an address inside subnet",
            ".gateway",
        ),
        rule(
            f"!({is_cidr}) || self.addresses.all(a, isIP(a) && ip(a).family() == {v} && "
            "cidr(self.subnet).containsIP(a) && a != self.gateway)",
            f"addresses must be IPv{v} addresses inside subnet, other than the gateway",
            ".addresses",
        ),
    )


class PublicFamily(KubeModel):
    """Public addresses of one family on one segment."""

    subnet: Annotated[str, Field(max_length=43)]
    """The public segment (203.0.113.0/24, 2001:db8:1::/64): guest addresses take its
    prefix length."""
    gateway: Annotated[str, Field(max_length=39)]
    """The segment's router, the guests' default route for this family."""
    addresses: Annotated[
        list[Annotated[str, Field(max_length=39)]],
        Field(min_length=1, max_length=1024, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ]
    """Addresses handed out, one per Zmachine."""


class PublicIPv4(PublicFamily):
    model_config = ConfigDict(json_schema_extra=_family_rules(4, "203.0.113.0/24"))


class PublicIPv6(PublicFamily):
    model_config = ConfigDict(json_schema_extra=_family_rules(6, "2001:db8:1::/64"))


class ZmachinePublicIPPoolSpec(KubeModel):
    """Public addresses of one segment, IPv4 and/or IPv6, each family with its gateway."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule("has(self.ipv4) || has(self.ipv6)", "a pool needs ipv4, ipv6 or both")
        )
    )

    ipv4: PublicIPv4 | None = None
    """Public IPv4 addresses."""
    ipv6: PublicIPv6 | None = None
    """Public IPv6 addresses."""


class Allocation(KubeModel):
    """One Zmachine's addresses from the pool."""

    uid: str
    """The Zmachine's uid."""
    zmachine: str
    """namespace/name of the Zmachine."""
    ipv4: str | None = None
    """Its IPv4 address with the subnet's prefix length."""
    ipv6: str | None = None
    """Its IPv6 address with the subnet's prefix length."""


class ZmachinePublicIPPoolStatus(KubeModel):
    """Who holds which address."""

    allocations: Annotated[list[Allocation], Field(json_schema_extra=list_map("uid"))] = []
    """One entry per Zmachine holding addresses of the pool."""
    free: int = 0
    """Zmachines the pool can still serve."""
