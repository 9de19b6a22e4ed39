"""The controller's in-memory view of nodes and of where Zmachines are placed.

Fed by watch events (kopf), and by placement decisions the moment they are taken, so that
two Zmachines created together never both take the last free slot of a node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity


@dataclass(frozen=True)
class Request:
    cpu: int
    memory: int


@dataclass
class NodeView:
    name: str
    address: str
    cpu: int
    memory: int
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    hypervisor: str = ""


@dataclass
class Placement:
    node: str
    request: Request
    namespace: str
    name: str


def quantity_bytes(value: Any) -> int:
    return int(parse_quantity(str(value)))  # type: ignore[no-untyped-call]


def request_of(spec: Mapping[str, Any]) -> Request:
    compute = spec.get("computeCapacity") or {}
    return Request(cpu=int(compute.get("cpu", 0)), memory=quantity_bytes(compute.get("memory", 0)))


@dataclass
class Inventory:
    nodes: dict[str, NodeView] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)  # by Zmachine uid

    def observe_node(self, name: str, spec: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        allocatable = status.get("allocatable") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        self.nodes[name] = NodeView(
            name=name,
            address=str(spec.get("address", "")),
            cpu=int(allocatable.get("cpu", 0)),
            memory=quantity_bytes(allocatable.get("memory", 0)),
            labels=dict(status.get("labels") or {}),
            ready=ready,
            hypervisor=str(status.get("hypervisor") or ""),
        )

    def forget_node(self, name: str) -> None:
        self.nodes.pop(name, None)

    def observe_zmachine(
        self, uid: str, meta: Mapping[str, Any], spec: Mapping[str, Any], node: str | None
    ) -> None:
        if node:
            self.placements[uid] = Placement(
                node, request_of(spec), str(meta.get("namespace")), str(meta.get("name"))
            )
        # An object whose status has not caught up yet keeps the placement taken for it.

    def forget_zmachine(self, uid: str) -> None:
        self.placements.pop(uid, None)

    def used(self, node: str) -> Request:
        here = [p.request for p in self.placements.values() if p.node == node]
        return Request(sum(r.cpu for r in here), sum(r.memory for r in here))

    def machines_on(self, node: str) -> list[Placement]:
        return [p for p in self.placements.values() if p.node == node]
