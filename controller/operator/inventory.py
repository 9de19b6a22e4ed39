"""The controller's in-memory view of nodes and of where Zmachines are placed.

Fed by watch events (kopf), and by placement decisions the moment they are taken, so that
two Zmachines created together never both take the last free slot of a node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity


@dataclass(frozen=True)
class Request:
    cpu: int
    memory: int


CPU_RATIO_ANNOTATION = "zos.threefold.io/cpu-allocation-ratio"


@dataclass
class NodeView:
    name: str
    address: str
    cores: int
    memory: int
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    hypervisor: str = ""
    cpu_ratio: float = 10.0
    unready_since: float | None = None  # monotonic; None while Ready
    uid: str = ""
    lease_namespace: str = ""
    conditions: list[dict[str, Any]] = field(default_factory=list)
    finalizers: list[str] = field(default_factory=list)
    # The node monitor saw its Lease renewed since this controller started. Until then a
    # Ready condition may be a dead agent's last word: nothing is placed there.
    renewing: bool = True
    wireguard_key: str = ""  # the node's overlay key; empty: no private networks there
    underlay: str = ""  # where other nodes reach its overlay
    public_interface: str = ""  # bridged to public NICs; empty: no publicIP there
    planetary_peer: str = ""  # its Yggdrasil router's URI; empty: no planetary there
    mycelium: bool = False  # runs mycelium routers

    @property
    def cpu(self) -> int:
        """vCPUs the node takes: cores times the allocation ratio (vCPUs are not cores)."""
        return int(self.cores * self.cpu_ratio)

    def ref(self) -> dict[str, Any]:
        """Enough of the object to post an Event about it."""
        meta = {"name": self.name, "uid": self.uid}
        return {"apiVersion": "zos.threefold.io/v1alpha1", "kind": "ZmachineNode", "metadata": meta}


@dataclass
class Placement:
    node: str
    request: Request
    namespace: str
    name: str


class Placements(dict[str, Placement]):
    """Placements by Zmachine uid that keep each node's totals as they change, so that
    a placement decision costs O(nodes), not O(nodes x placements)."""

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, tuple[int, int, int]] = {}  # node -> (cpu, memory, count)

    def _add(self, p: Placement, sign: int) -> None:
        cpu, memory, count = self.totals.get(p.node, (0, 0, 0))
        total = (cpu + sign * p.request.cpu, memory + sign * p.request.memory, count + sign)
        if total[2]:
            self.totals[p.node] = total
        else:
            self.totals.pop(p.node, None)

    def __setitem__(self, uid: str, placement: Placement) -> None:
        old = self.get(uid)
        if old is not None:
            self._add(old, -1)
        super().__setitem__(uid, placement)
        self._add(placement, 1)

    def __delitem__(self, uid: str) -> None:
        self._add(self[uid], -1)
        super().__delitem__(uid)

    def setdefault(self, uid: str, placement: Placement) -> Placement:
        if uid not in self:
            self[uid] = placement
        return self[uid]

    def pop(self, uid: str, default: Any = None) -> Any:
        if uid not in self:
            return default
        placement = self[uid]
        del self[uid]
        return placement


def quantity_bytes(value: Any) -> int:
    return int(parse_quantity(str(value)))  # type: ignore[no-untyped-call]


def request_of(spec: Mapping[str, Any]) -> Request:
    compute = spec.get("computeCapacity") or {}
    return Request(cpu=int(compute.get("cpu", 0)), memory=quantity_bytes(compute.get("memory", 0)))


def cpu_ratio(meta: Mapping[str, Any], default: float) -> float:
    """The node's own ratio from its annotation, else the controller's default."""
    raw = (meta.get("annotations") or {}).get(CPU_RATIO_ANNOTATION)
    try:
        ratio = float(raw) if raw is not None else default
    except ValueError:
        return default
    return ratio if ratio > 0 else default


@dataclass
class Inventory:
    cpu_ratio: float = 10.0
    nodes: dict[str, NodeView] = field(default_factory=dict)
    placements: Placements = field(default_factory=Placements)  # by Zmachine uid
    deleted_nodes: dict[str, float] = field(default_factory=dict)  # name -> monotonic
    started: float = field(default_factory=time.monotonic)
    # Called when room may have appeared: a node joined, became Ready or grew, a placement
    # went away. Pending Zmachines are tried again then, not on a timer.
    on_capacity: Callable[[], None] = lambda: None

    def capacity_changed(self) -> None:
        self.on_capacity()

    def observe_node(
        self,
        name: str,
        meta: Mapping[str, Any],
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
    ) -> None:
        allocatable = status.get("allocatable") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        previous = self.nodes.get(name)
        since = None
        if not ready:
            since = previous.unready_since if previous is not None else None
            since = since if since is not None else time.monotonic()
        self.deleted_nodes.pop(name, None)
        renewing = previous.renewing if previous is not None else False
        node = self.nodes[name] = NodeView(
            name=name,
            address=str(spec.get("address", "")),
            cores=int(allocatable.get("cpu", 0)),
            memory=quantity_bytes(allocatable.get("memory", 0)),
            labels=dict(status.get("labels") or {}),
            ready=ready,
            hypervisor=str(status.get("hypervisor") or ""),
            cpu_ratio=cpu_ratio(meta, self.cpu_ratio),
            unready_since=since,
            uid=str(meta.get("uid") or ""),
            lease_namespace=str(spec.get("leaseNamespace") or ""),
            wireguard_key=str(status.get("wireguardPublicKey") or ""),
            underlay=str(status.get("underlayAddress") or ""),
            public_interface=str(status.get("publicInterface") or ""),
            planetary_peer=str(status.get("planetaryPeer") or ""),
            mycelium=bool(status.get("mycelium")),
            conditions=[dict(c) for c in status.get("conditions") or []],
            finalizers=list(meta.get("finalizers") or []),
            renewing=renewing,
        )
        if node.ready and (
            previous is None
            or not previous.ready
            or (previous.cpu, previous.memory, previous.labels)
            != (node.cpu, node.memory, node.labels)
        ):
            self.capacity_changed()

    def mark_unready(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is not None and node.ready:
            node.ready = False
            node.unready_since = time.monotonic()

    def forget_node(self, name: str) -> None:
        if self.nodes.pop(name, None) is not None:
            self.deleted_nodes[name] = time.monotonic()

    def lost_for(self, name: str) -> float:
        """Seconds the node has been not Ready or deleted; 0 while Ready. A node this
        controller never saw counts from its own start."""
        now = time.monotonic()
        node = self.nodes.get(name)
        if node is not None:
            return 0.0 if node.ready else now - (node.unready_since or now)
        return now - self.deleted_nodes.get(name, self.started)

    def node_of(self, uid: str) -> str | None:
        placement = self.placements.get(uid)
        return None if placement is None else placement.node

    def observe_zmachine(
        self, uid: str, meta: Mapping[str, Any], spec: Mapping[str, Any], node: str | None
    ) -> None:
        if node:
            self.placements[uid] = Placement(
                node, request_of(spec), str(meta.get("namespace")), str(meta.get("name"))
            )
        # An object whose status has not caught up yet keeps the placement taken for it.

    def forget_zmachine(self, uid: str) -> None:
        if self.placements.pop(uid, None) is not None:
            self.capacity_changed()

    def used(self, node: str) -> Request:
        cpu, memory, _ = self.placements.totals.get(node, (0, 0, 0))
        return Request(cpu, memory)

    def count_on(self, node: str) -> int:
        return self.placements.totals.get(node, (0, 0, 0))[2]
