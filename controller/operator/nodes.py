"""The node monitor: one loop, outside kopf, over every registered ZmachineNode.

It judges liveness from the node's Lease, publishes what is placed on each node, and
collects orphans: VMs an agent runs for no Zmachine placed there. It is a plain task rather
than a kopf timer because kopf puts a finalizer on every object a timer serves, and a
finalizer on a ZmachineNode blocks its deletion whenever the controller is down.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from controller.agent.registration import lease_name
from controller.api import conditions as cond
from controller.api.zmachinenode import LEASE_NAMESPACE_DEFAULT
from controller.kube import LeaseObserver
from controller.operator.errors import ControllerError
from controller.operator.inventory import NodeView
from controller.operator.machines import NodeWatches
from controller.operator.reconcile import Runtime, placement_of

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

LEGACY_FINALIZER = "zos.threefold.io/finalizer"


@dataclass
class NodeMonitor:
    rt: Runtime
    namespaces: Sequence[str] = ()  # globs this controller watches; empty: all
    interval: float = 5.0
    orphan_grace: float = 60.0
    leases: LeaseObserver = field(default_factory=LeaseObserver)
    # (node, uid) -> monotonic time the VM was first seen without a Zmachine placed there.
    suspects: dict[tuple[str, str], float] = field(default_factory=dict)
    published: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> status
    first_seen: dict[str, str] = field(default_factory=dict)  # node -> Lease version at start
    watches: NodeWatches = field(init=False)

    def __post_init__(self) -> None:
        self.watches = NodeWatches(
            self.rt.agents, self.rt.machines, lambda uid: self.rt.kick(uid, "agent")
        )

    async def run(self, synced: asyncio.Event | None = None) -> None:
        """`synced`: set once the caches are filled; no node is judged before."""
        if synced is not None:
            await synced.wait()
        while True:
            await self.tick()
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        for node in list(self.rt.inventory.nodes.values()):
            try:
                await self.check(node)
            except ControllerError as exc:
                log.warning("node check failed", node=node.name, error=str(exc))
        for per_node in (self.published, self.first_seen):
            for name in [n for n in per_node if n not in self.rt.inventory.nodes]:
                del per_node[name]
        for key in [k for k in self.suspects if k[0] not in self.rt.inventory.nodes]:
            del self.suspects[key]

    async def check(self, node: NodeView) -> None:
        await self._liveness(node)
        await self._publish(node)
        if node.ready:
            await self.collect_orphans(node)

    async def _liveness(self, node: NodeView) -> None:
        namespace = node.lease_namespace or LEASE_NAMESPACE_DEFAULT
        lease = await self.rt.kube.lease(namespace, lease_name(node.name))
        version = lease.metadata.resource_version if lease and lease.metadata else None
        if not node.renewing and version is not None:
            # Placement waits for a renewal seen with our own eyes (client-go's observedTime
            # gives a Lease seen first a whole duration, a dead agent's Lease included).
            first = self.first_seen.setdefault(node.name, version)
            node.renewing = first != version
            if node.renewing:
                self.rt.inventory.capacity_changed()
        # By our own clock since the Lease last changed, never the agent's renewTime against
        # our wall clock; a Lease first seen after our start gets its whole duration.
        if (lease is not None and not self.leases.expired(lease)) or not node.ready:
            return
        # Only the controller turns Ready false; the agent turns it true with each heartbeat.
        log.warning("node lease expired", node=node.name)
        self.rt.inventory.mark_unready(node.name)
        self.rt.kick_node(node.name, "node")
        ready = cond.set_condition(
            node.conditions,
            "Ready", False, "LeaseExpired", "the agent stopped renewing its Lease", None,
        )  # fmt: skip
        await self.rt.kube.patch_node(node.name, {"status": {"conditions": ready}}, status=True)
        await self.rt.kube.event(
            node.ref(), "Warning", "NodeNotReady", f"node {node.name} stopped renewing its Lease"
        )

    async def _publish(self, node: NodeView) -> None:
        if LEGACY_FINALIZER in node.finalizers:
            # Earlier versions served nodes from a kopf timer, which added this finalizer.
            kept = [f for f in node.finalizers if f != LEGACY_FINALIZER]
            await self.rt.kube.patch_node(node.name, {"metadata": {"finalizers": kept}}, False)
            node.finalizers = kept
        used = self.rt.inventory.used(node.name)
        status = {
            "used": {"cpu": used.cpu, "memory": f"{used.memory // (1024 * 1024)}Mi"},
            "machines": self.rt.inventory.count_on(node.name),
        }
        if self.published.get(node.name) != status:
            await self.rt.kube.patch_node(node.name, {"status": status}, status=True)
            self.published[node.name] = status

    def _ours(self, namespace: str) -> bool:
        return not self.namespaces or any(fnmatch.fnmatch(namespace, g) for g in self.namespaces)

    async def collect_orphans(self, node: NodeView) -> list[str]:
        """Remove VMs whose Zmachine is gone, replaced or placed elsewhere, once they have
        looked orphaned for the grace period and the API server confirms it. Returns the
        uids removed."""
        agent = self.rt.agents.client(node.address)
        if node.name in self.rt.machines.synced:  # pushed by the node: no List needed
            machines = self.rt.machines.machines(node.name)
        else:
            machines = await agent.list()
        now = time.monotonic()
        seen: set[tuple[str, str]] = set()
        removed = []
        for machine in machines:
            ref = machine.ref
            key = (node.name, ref.uid)
            if not self._ours(ref.namespace) or self.rt.inventory.node_of(ref.uid) == node.name:
                continue
            seen.add(key)
            first = self.suspects.setdefault(key, now)
            if now - first < self.orphan_grace:
                continue
            found = await self.rt.kube.zmachine(ref.namespace, ref.name)
            why = _orphan_reason(found, ref.uid, node.name)
            if why is None:
                assert found is not None
                placement = placement_of(found)
                if placement is not None:
                    self.rt.inventory.placements[ref.uid] = placement
                continue
            async with self.rt.locks[ref.uid]:
                await agent.delete(ref.uid)
            removed.append(ref.uid)
            message = f"removed VM of zmachine {ref.namespace}/{ref.name} (uid {ref.uid}): {why}"
            log.warning(
                "orphan removed", node=node.name, namespace=ref.namespace, name=ref.name,
                uid=ref.uid, why=why,
            )  # fmt: skip
            await self.rt.kube.event(node.ref(), "Warning", "OrphanRemoved", message)
        for key in [k for k in self.suspects if k[0] == node.name and k not in seen]:
            del self.suspects[key]
        return removed


def _orphan_reason(found: dict[str, Any] | None, uid: str, node: str) -> str | None:
    """Why a VM of `uid` on `node` has no owner, per the API server; None if it has one."""
    if found is None:
        return "its Zmachine no longer exists"
    meta = found.get("metadata") or {}
    if meta.get("uid") != uid:
        return f"its Zmachine was recreated (now uid {meta.get('uid')})"
    placed = (found.get("status") or {}).get("nodeName")
    if placed == node:
        return None
    if placed:
        return f"its Zmachine is placed on node {placed}"
    return "its Zmachine is placed on no node"
