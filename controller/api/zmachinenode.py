"""The ZmachineNode custom resource: one per node agent, registered by the agent itself."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from controller.api.base import KubeModel, Quantity
from controller.api.zmachine import Conditions

KIND = "ZmachineNode"
PLURAL = "zmachinenodes"
# Leases renewed by the agents live here; the controller reads them to judge liveness.
LEASE_NAMESPACE_DEFAULT = "zmachine-system"


class ZmachineNodeSpec(KubeModel):
    """How to reach a node agent."""

    address: Annotated[str, Field(min_length=1, max_length=255)]
    """host:port of the agent's gRPC endpoint."""
    lease_namespace: str = LEASE_NAMESPACE_DEFAULT
    """Namespace of the Lease the agent renews as its heartbeat (named after the node)."""


class NodeResources(KubeModel):
    """CPU and memory of a node."""

    cpu: int = 0
    """Logical CPUs."""
    memory: Quantity = 0
    """Memory as a quantity, for example 8192Mi."""


class ZmachineNodeStatus(KubeModel):
    """What the agent reports about its node."""

    capacity: NodeResources | None = None
    """Everything the node has."""
    allocatable: NodeResources | None = None
    """What Zmachines may use."""
    used: NodeResources | None = None
    """Reserved by Zmachines placed on the node, as the controller counts it."""
    machines: int = 0
    """Zmachines placed on the node."""
    hypervisor: str | None = None
    """cloud-hypervisor or qemu."""
    hypervisor_version: str | None = None
    hardware_acceleration: bool = False
    """KVM is usable."""
    agent_version: str | None = None
    wireguard_public_key: str | None = None
    """The node's overlay key (base64); absent when the node cannot join private networks
    (no wireguard-go, or no underlay address)."""
    underlay_address: str | None = None
    """Where other nodes reach this node's overlay."""
    public_interface: str | None = None
    """The interface public NICs are bridged to; absent: no spec.network.publicIP here."""
    planetary_peer: str | None = None
    """Where other nodes' Yggdrasil routers reach this node's (tls://IP:port); absent: no
    spec.network.planetary here."""
    mycelium: bool = False
    """The node runs mycelium routers (the mycelium binary is there): spec.network.mycelium
    can be placed here."""
    labels: dict[str, str] = {}
    """Labels of the Kubernetes node, matched against spec.nodeSelector."""
    conditions: Conditions = []
    """Ready: the agent answers and renews its Lease."""
