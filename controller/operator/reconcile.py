"""Level-based reconciliation of one Zmachine against what its node agent reports."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.spec import MYCELIUM_NETWORK, PLANETARY_NETWORK, PUBLIC_NETWORK
from controller.api import conditions as cond
from controller.api import subresources
from controller.api.zmachine import BootMode, Phase, ZmachineSpec
from controller.operator import metrics, networks, planetary, publicips
from controller.operator.agents import AgentPool
from controller.operator.errors import (
    AgentRejected,
    ControllerError,
    NetworkFull,
    NetworkMisfit,
    NetworkUnavailable,
    NodeOutOfCapacity,
    PublicIPExhausted,
    SecretUnavailable,
    UnsupportedSpec,
)
from controller.operator.inventory import Inventory, NodeView, Placement, request_of
from controller.operator.kubeapi import Conflict, Gone, Kube, age_seconds
from controller.operator.machines import MachineCache
from controller.operator.placement import Decision, choose_node, resize_misfit
from controller.operator.status import StatusWriter
from controller.operator.translate import (
    SecretReader,
    agent_spec,
    env_to_deploy,
    refuse_unsupported,
    resolve_env,
)

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

METRICS_INTERVAL = 600.0  # default seconds between status.metrics snapshots (0: never)
_BOOT = {
    pb.BOOT_MODE_CONTAINER: BootMode.CONTAINER,
    pb.BOOT_MODE_VM: BootMode.VM,
    pb.BOOT_MODE_IMAGE: BootMode.IMAGE,
}
_PHASE = {
    pb.MACHINE_STATE_PROVISIONING: Phase.PROVISIONING,
    pb.MACHINE_STATE_RUNNING: Phase.RUNNING,
    pb.MACHINE_STATE_PAUSED: Phase.PAUSED,
    pb.MACHINE_STATE_RESTARTING: Phase.PROVISIONING,
    pb.MACHINE_STATE_SUCCEEDED: Phase.STOPPED,
    pb.MACHINE_STATE_FAILED: Phase.FAILED,
}


AVOID_SECONDS = 300.0  # how long a node that refused a Zmachine is skipped for it
PROVISION_FAILED = "ProvisionFailed"  # the agent's reason: provisioning failed, host cleaned
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 10.0, 300.0
# Two Lease durations: a live agent renews every 10 s and the Leases are checked every 5 s,
# so one may first be seen renewing 20 s or more after a start.
STARTUP_NODE_GRACE = 40.0
AGAIN_SECONDS = 10.0  # a missing Secret or an unreachable agent is looked at again after


@dataclass
class Runtime:
    """What every handler shares: the inventory, agent clients and the API access."""

    inventory: Inventory
    agents: AgentPool
    read_secret: SecretReader
    kube: Kube
    delete_timeout: float = 300.0
    node_lost_timeout: float = 300.0
    placements_seeded: bool = False
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What the agents run, pushed by their event streams (controller.operator.machines).
    machines: MachineCache = field(default_factory=MachineCache)
    metrics_interval: float = METRICS_INTERVAL
    # Zmachines no node could take: reconciled again when capacity changes.
    pending: set[str] = field(default_factory=set)
    # What each node acknowledged of each network's peers (the network timer's pushes).
    peer_pushes: networks.PeerPushes = field(default_factory=networks.PeerPushes)
    # Asks for a reconciliation of a uid (the worker's queue); `cause` feeds a metric.
    kick: Callable[[str, str], None] = lambda uid, cause: None
    # Takes an object as one of our own writes returned it (the worker's view of it).
    seen: Callable[[Mapping[str, Any]], None] = lambda found: None

    def later(self, uid: str, delay: float, cause: str) -> None:
        """Reconcile `uid` again after `delay` seconds (a timer, not a resync of all)."""
        asyncio.get_running_loop().call_later(delay, self.kick, uid, cause)

    def kick_node(self, node: str, cause: str) -> None:
        """Every Zmachine placed on `node` (its health changed)."""
        for uid in [u for u, p in self.inventory.placements.items() if p.node == node]:
            self.kick(uid, cause)

    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    # uid -> node -> monotonic expiry: nodes that refused the Zmachine for lack of capacity.
    avoid: dict[str, dict[str, float]] = field(default_factory=dict)
    # uid -> (attempts, monotonic time of the next) for provisionings the node reported failed.
    retries: dict[str, tuple[int, float]] = field(default_factory=dict)

    def retry_due(self, uid: str, machine: pb.Machine | None) -> bool:
        """A provisioning that failed on the node (the host was cleaned up) is sent again,
        with exponential backoff; any other state clears the count."""
        if (
            machine is None
            or machine.state != pb.MACHINE_STATE_FAILED
            or (machine.reason != PROVISION_FAILED)
        ):
            self.retries.pop(uid, None)
            return False
        now = time.monotonic()
        if uid not in self.retries:  # just seen failed: the first retry after the base delay
            self.retries[uid] = (0, now + RETRY_BASE_SECONDS)
            self.later(uid, RETRY_BASE_SECONDS, "retry")
            return False
        attempts, due = self.retries[uid]
        if now < due:
            self.later(uid, due - now, "retry")
            return False
        delay = min(RETRY_BASE_SECONDS * 2 ** (attempts + 1), RETRY_MAX_SECONDS)
        self.retries[uid] = (attempts + 1, now + delay)
        self.later(uid, delay, "retry")
        return True

    def avoided(self, uid: str) -> set[str]:
        now = time.monotonic()
        nodes = {n: t for n, t in self.avoid.get(uid, {}).items() if t > now}
        if nodes:
            self.avoid[uid] = nodes
        else:
            self.avoid.pop(uid, None)
        return set(nodes)

    def forget(self, uid: str) -> None:
        """Drop every per-object entry once the Zmachine is gone from the API. Not the
        node's machine cache: it mirrors the agents, which prune it with their Deleted
        events; a VM still there (released without the node's confirmation) is an orphan,
        and orphan collection reads the cache to find it."""
        self.inventory.forget_zmachine(uid)
        self.pending.discard(uid)
        self.avoid.pop(uid, None)
        self.retries.pop(uid, None)
        lock = self.locks.get(uid)
        if lock is not None and not lock.locked():
            del self.locks[uid]


@dataclass
class Target:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str | None
    resource_version: str = ""

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> Target:
        return cls(
            str(meta["namespace"]),
            str(meta["name"]),
            str(meta["uid"]),
            int(meta.get("generation") or 1),
            meta.get("creationTimestamp"),
            str(meta.get("resourceVersion") or ""),
        )

    def ref(self) -> pb.ZmachineRef:
        return pb.ZmachineRef(namespace=self.namespace, name=self.name, uid=self.uid)

    def __str__(self) -> str:
        return f"zmachine {self.namespace}/{self.name}"


def _same(found: Mapping[str, Any] | None, target: Target) -> bool:
    """The object the API has now is this Zmachine, and it is not being deleted."""
    meta = (found or {}).get("metadata") or {}
    return meta.get("uid") == target.uid and not meta.get("deletionTimestamp")


async def converge(
    rt: Runtime,
    target: Target,
    raw_spec: Mapping[str, Any],
    out: StatusWriter,
) -> None:
    """Bring the node in line with the spec, then report what the node says.

    Everything is decided inside the per-uid lock from the freshest view there is (our own
    placements first, then the body), never from a body read before the lock was taken.
    """
    logger = log.bind(namespace=target.namespace, name=target.name, uid=target.uid)
    async with rt.locks[target.uid]:
        spec = ZmachineSpec.model_validate(dict(raw_spec))
        try:
            refuse_unsupported(spec)
        except UnsupportedSpec as exc:
            out.set("observedGeneration", target.generation)
            out.condition(cond.READY, False, exc.reason, str(exc))
            out.phase_to(Phase.FAILED, exc.reason, str(exc))
            return
        try:
            att = await networks.attachment(rt.kube, target.namespace, spec)
        except NetworkUnavailable as exc:
            out.set("observedGeneration", target.generation)
            out.condition(cond.SCHEDULED, False, exc.reason, str(exc))
            out.phase_to(Phase.PENDING, exc.reason, str(exc))
            return
        except NetworkMisfit as exc:
            _refused(out, target, exc)
            return
        node_name = rt.inventory.node_of(target.uid) or out.current.get("nodeName")
        if node_name and not spec.node_name:
            lost = rt.inventory.lost_for(node_name)
            if lost >= rt.node_lost_timeout:
                why = f"node {node_name} has been gone or not Ready for {lost:.0f}s"
                if not await _unbind(rt, target, node_name, out, "NodeLost", why):
                    return
                node_name = None
        wants = Wants(
            public=bool(spec.network and spec.network.public_ip),
            planetary=bool(spec.network and spec.network.planetary),
            mycelium=bool(spec.network and spec.network.mycelium),
        )
        if not node_name:
            node_name = await _place(rt, target, raw_spec, spec, att, wants, out)
            if node_name is None:
                return
        elif spec.node_name and spec.node_name != node_name:
            out.condition(
                cond.SCHEDULED,
                True,
                "NodeNameImmutable",
                f"running on {node_name}; spec.nodeName {spec.node_name} applies only "
                "at creation (delete and recreate to move it)",
            )

        node = _on_node(rt, target, node_name, out)
        if node is None:
            _node_unknown(
                rt, out, node_name, pinned=bool(spec.node_name),
                deleted=node_name not in rt.inventory.nodes,
            )  # fmt: skip
            if not spec.node_name:  # placed elsewhere once the node is lost for good
                left = rt.node_lost_timeout - rt.inventory.lost_for(node_name)
                rt.later(target.uid, max(left, 0.0) + 1.0, "node-lost")
            return
        agent = rt.agents.client(node.address)
        machine: pb.Machine | None = None
        try:
            if wants.planetary:
                # Every pass: nodes that joined since are dialled too.
                await agent.apply_planetary(planetary.peers_for(node_name, rt.inventory.nodes))
            seq = rt.machines.seq
            if node_name in rt.machines.synced:
                machine = rt.machines.get(node_name, target.uid)
            else:
                # The node's event stream is down or not synced yet: ask, and ask again
                # until it is back (its resync then reports every change).
                machine = await agent.get(target.uid)
                rt.later(target.uid, AGAIN_SECONDS, "unsynced")
            if machine is None or machine.generation < target.generation:
                refusal = await _deploy_refusal(rt, target, raw_spec, node_name, machine)
                if refusal is not None:
                    if machine is not None:
                        rt.pending.add(target.uid)  # the resize waits for room
                        _report(out, target, machine)
                        out.condition(
                            cond.PROVISIONED, False, "ResizeUnschedulable", refusal,
                            target.generation,
                        )  # fmt: skip
                    return
            env: dict[str, str] | None
            if rt.retry_due(target.uid, machine):
                env = await asyncio.to_thread(resolve_env, spec, target.namespace, rt.read_secret)
                logger.info("provisioning failed on the node; deploying again", node=node_name)
            else:
                env = await asyncio.to_thread(
                    env_to_deploy, spec, target.namespace, target.generation, machine,
                    rt.read_secret,
                )  # fmt: skip
            if env is not None:
                interfaces = []
                if att is not None:
                    network = await networks.ensure_subnet(rt.kube, att, node_name)
                    ip = str(att.ip) if att.ip else None  # else the node's IPAM picks one
                    interfaces.append(networks.agent_interface(network, node_name, ip))
                public = None
                if wants.public:
                    async with rt.placement_lock:  # placed earlier, or publicIP added since
                        held = await publicips.allocate(
                            rt.kube, target.uid, f"{target.namespace}/{target.name}"
                        )
                    public = held.to_pb()
                response = await agent.deploy(
                    target.ref(),
                    target.generation,
                    agent_spec(spec, target.name, env, interfaces, public),
                )
                first = machine is None
                machine = response.machine
                rt.machines.put(node_name, machine, unless_after=seq)
                if not wants.public:
                    # publicIP dropped (or never asked): the node runs without it now.
                    await publicips.release(rt.kube, target.uid)
                if response.changed:
                    logger.info("deployed", node=node_name, generation=target.generation)
                    if first and machine.state == pb.MACHINE_STATE_PROVISIONING:
                        # The status written with the placement says it; the agent's
                        # stream brings the outcome (or the next pass asks).
                        return
                    out.event("Deployed", f"generation {target.generation} sent to {node_name}")
            assert machine is not None  # env_to_deploy deploys whenever the agent had none
        except (SecretUnavailable, PublicIPExhausted) as exc:
            out.condition(cond.PROVISIONED, False, exc.reason, str(exc))
            out.phase_to(Phase.PENDING, exc.reason, str(exc))
            rt.later(target.uid, AGAIN_SECONDS, "secret")  # Secrets are not watched
            return
        except NodeOutOfCapacity as exc:
            if machine is None and not spec.node_name:
                # A first Deploy refused: the node knows its memory better than our view.
                rt.avoid.setdefault(target.uid, {})[node_name] = time.monotonic() + AVOID_SECONDS
                await _unbind(rt, target, node_name, out, exc.reason, str(exc))
                return
            # Pinned, or a resize: the node keeps what it runs; tried again when room appears.
            rt.pending.add(target.uid)
            out.condition(cond.PROVISIONED, False, exc.reason, str(exc), target.generation)
            if machine is None:
                out.phase_to(Phase.PENDING, exc.reason, str(exc))
            else:
                _report(out, target, machine)
            return
        except NetworkMisfit as exc:
            _refused(out, target, exc, machine)
            return
        except AgentRejected as exc:
            out.condition(cond.PROVISIONED, False, exc.reason, str(exc), _running(machine))
            out.condition(cond.READY, False, exc.reason, str(exc), _running(machine))
            out.phase_to(Phase.FAILED, exc.reason, str(exc))
            return
        except ControllerError as exc:
            logger.warning("agent call failed", node=node_name, error=str(exc))
            message = f"node {node_name}: {exc}"
            out.condition(cond.READY, None, "AgentUnreachable", message, _running(machine))
            out.phase_to(Phase.UNKNOWN, "AgentUnreachable", message)
            rt.later(target.uid, AGAIN_SECONDS, "unreachable")
            return
        _report(out, target, machine)
        if rt.metrics_interval > 0 and machine.state in (
            pb.MACHINE_STATE_RUNNING,
            pb.MACHINE_STATE_PAUSED,
        ):
            await _sample_metrics(agent, target, out, logger, rt.metrics_interval)


def _refused(
    out: StatusWriter, target: Target, exc: ControllerError, machine: pb.Machine | None = None
) -> None:
    """A spec this controller will not serve as it stands: Failed until the spec changes."""
    out.set("observedGeneration", target.generation)
    out.condition(cond.PROVISIONED, False, exc.reason, str(exc), _running(machine))
    out.condition(cond.READY, False, exc.reason, str(exc), _running(machine))
    out.phase_to(Phase.FAILED, exc.reason, str(exc))


def _running(machine: pb.Machine | None) -> int | None:
    """The generation a condition about the node's machine describes (None: unknown)."""
    return None if machine is None else int(machine.generation)


def _node_unknown(rt: Runtime, out: StatusWriter, node: str, pinned: bool, deleted: bool) -> None:
    if deleted:
        reason, what = "NodeDeleted", f"node {node} is not registered (its ZmachineNode is gone)"
    else:
        reason, what = "NodeNotReady", f"node {node} stopped renewing its Lease"
    if pinned:
        then = "it stays there (spec.nodeName) until the node returns or the Zmachine is deleted"
    else:
        then = f"placed again elsewhere after {rt.node_lost_timeout:.0f}s"
    out.condition(cond.NODE_READY, False, reason, f"{what}; {then}")
    out.condition(cond.READY, None, reason, f"node {node} is not Ready")
    out.phase_to(Phase.UNKNOWN, reason, f"{what}; state unknown; {then}")


async def _deploy_refusal(
    rt: Runtime,
    target: Target,
    raw_spec: Mapping[str, Any],
    node_name: str,
    machine: pb.Machine | None,
) -> str | None:
    """Why nothing may be sent now, or None. A new VM goes out only for an object that still
    exists, undeleted and bound to this node (a handler may hold a body older than a
    delete); a new generation only if it fits the node."""
    if machine is None:
        found = await rt.kube.zmachine(target.namespace, target.name)
        bound = ((found or {}).get("status") or {}).get("nodeName")
        if _same(found, target) and bound == node_name:
            return None
        log.info(
            "not deploying: the object changed", namespace=target.namespace,
            name=target.name, uid=target.uid, node=node_name, bound=bound,
        )  # fmt: skip
        return f"the object is gone, deleting or bound to {bound}"
    node = rt.inventory.nodes[node_name]
    why = resize_misfit(rt.inventory, target.uid, node, request_of(raw_spec))
    if why is None:
        return None
    return (
        f"generation {target.generation} does not fit on node {node_name}: {why}; "
        f"generation {machine.generation} keeps running"
    )


async def _place(
    rt: Runtime,
    target: Target,
    raw_spec: Mapping[str, Any],
    spec: ZmachineSpec,
    att: networks.Attachment | None,
    wants: Wants,
    out: StatusWriter,
) -> str | None:
    """Choose a node and make the choice durable (status.nodeName, written with the
    object's resourceVersion) before anything is deployed. A node serving the Zmachine's
    network gets its /24 of it first (a subnet outlives a lost bind: the node keeps it),
    and a Zmachine with publicIP its addresses (released when it is deleted)."""
    request = request_of(raw_spec)
    async with rt.placement_lock:
        if not rt.placements_seeded:
            # Right after start the watch may not have delivered every placed Zmachine yet:
            # count what the API says once; from then on the watch and our own reservations do.
            for item in await rt.kube.list_zmachines():
                placement = placement_of(item)
                if placement is not None:
                    rt.inventory.placements.setdefault(str(item["metadata"]["uid"]), placement)
            rt.placements_seeded = True
        if not spec.node_name and _judging_nodes(rt, target, out):
            return None
        decision = choose_node(
            rt.inventory,
            request,
            spec.node_selector,
            pinned=spec.node_name,
            avoid=rt.avoided(target.uid),
            misfit=_misfits(att, wants),
        )
        try:
            if decision.node is not None and att is not None:
                await networks.ensure_subnet(rt.kube, att, decision.node)
            if decision.node is not None and wants.public:
                await publicips.allocate(rt.kube, target.uid, f"{target.namespace}/{target.name}")
        except (NetworkFull, NetworkMisfit, PublicIPExhausted) as exc:
            decision = Decision(None, "Unschedulable", str(exc))
        if decision.node is None:
            rt.pending.add(target.uid)
            out.set("observedGeneration", target.generation)
            out.condition(cond.SCHEDULED, False, decision.reason, decision.message)
            out.phase_to(Phase.PENDING, decision.reason, decision.message)
            return None
        rt.pending.discard(target.uid)
        # Reserved before the write, so that placements running meanwhile count it.
        rt.inventory.placements[target.uid] = Placement(
            decision.node, request, target.namespace, target.name
        )
    # What the Zmachine says from now on goes out with the placement, in one write: the
    # first Deploy follows at once, and the agent's stream reports what comes of it.
    out.condition(cond.SCHEDULED, True, decision.reason, decision.message)
    out.phase_to(Phase.PROVISIONING, decision.reason, f"{decision.message}; deploying")
    _on_node(rt, target, decision.node, out)  # else a second write at the end of this pass
    with_placement = dict(out.patch.status)
    try:
        node = await _bind(rt, target, decision.node, with_placement)
    except BaseException:
        rt.inventory.forget_zmachine(target.uid)
        raise
    if node is None:
        rt.inventory.forget_zmachine(target.uid)
        return None
    if node != decision.node:
        rt.inventory.placements[target.uid] = Placement(
            node, request, target.namespace, target.name
        )
        return node
    out.written(with_placement)
    return node


def _on_node(rt: Runtime, target: Target, node_name: str, out: StatusWriter) -> NodeView | None:
    """What the status says of a Zmachine placed on ``node_name``: its console URL, and
    that the node is Ready when it is; the node's view then, None if it is not Ready."""
    # Served by the console server through the API server (docs/console.md).
    out.set("consoleURL", subresources.path(target.namespace, target.name, subresources.CONSOLE))
    node = rt.inventory.nodes.get(node_name)
    if node is None or not node.ready:
        return None
    out.condition(cond.NODE_READY, True, "NodeReady", f"node {node_name} is Ready")
    return node


@dataclass(frozen=True)
class Wants:
    """The node-dependent interfaces a Zmachine asks for besides its private one."""

    public: bool
    planetary: bool
    mycelium: bool


def _misfits(
    att: networks.Attachment | None, wants: Wants
) -> Callable[[NodeView], str | None] | None:
    """Why a node cannot serve the Zmachine's network attachments, if it cannot."""
    asked = [
        att.misfit if att else None,
        publicips.misfit if wants.public else None,
        planetary.misfit if wants.planetary else None,
        _no_mycelium if wants.mycelium else None,
    ]
    checks = [c for c in asked if c is not None]
    if not checks:
        return None
    return lambda node: next((why for check in checks if (why := check(node))), None)


def _no_mycelium(node: NodeView) -> str | None:
    return None if node.mycelium else "has no mycelium router (mycelium)"


def _judging_nodes(rt: Runtime, target: Target, out: StatusWriter) -> bool:
    """Right after a start, a Ready node whose Lease has not been seen renewed yet may be
    alive or dead: wait one Lease duration for it rather than pile every placement onto
    the nodes that happened to renew first. True: the Zmachine waits (Pending)."""
    unsure = sorted(n.name for n in rt.inventory.nodes.values() if n.ready and not n.renewing)
    left = STARTUP_NODE_GRACE - (time.monotonic() - rt.inventory.started)
    if not unsure or left <= 0:
        return False
    rt.pending.add(target.uid)  # placed as soon as they renew (a capacity change)...
    rt.later(target.uid, left, "startup")  # ...or once they had their chance
    message = f"waiting up to {left:.0f}s for nodes {', '.join(unsure)} to renew their Leases"
    out.set("observedGeneration", target.generation)
    out.condition(cond.SCHEDULED, False, "WaitingForNodes", message)
    out.phase_to(Phase.PENDING, "WaitingForNodes", message)
    return True


async def _bind(rt: Runtime, target: Target, node: str, status: dict[str, Any]) -> str | None:
    """Write the placement (with `status`); the node that stands afterwards, or None if the
    object is gone. A placement someone else made meanwhile wins over ours."""
    version = target.resource_version
    for _ in range(3):
        try:
            rt.seen(await rt.kube.set_node(target.namespace, target.name, version, node, status))
            return node
        except Conflict:
            found = await rt.kube.zmachine(target.namespace, target.name)
            if not _same(found, target):
                return None
            assert found is not None
            standing = (found.get("status") or {}).get("nodeName")
            if standing:
                return str(standing)
            version = str(found["metadata"]["resourceVersion"])
        except Gone:
            return None
    raise Conflict(f"{target}: placement kept conflicting with other writers")


async def _unbind(
    rt: Runtime, target: Target, node: str, out: StatusWriter, reason: str, why: str
) -> bool:
    """Clear a placement so that the next pass places the Zmachine again. Whatever still
    runs on the old node is an orphan there, removed by that node's orphan collection."""
    found = await rt.kube.zmachine(target.namespace, target.name)
    if not _same(found, target):
        return False
    assert found is not None
    if (found.get("status") or {}).get("nodeName") == node:
        try:
            await rt.kube.set_node(
                target.namespace, target.name, str(found["metadata"]["resourceVersion"]), None
            )
        except (Conflict, Gone):
            return False  # someone else changed it: the next pass decides again
    rt.inventory.forget_zmachine(target.uid)
    message = f"{why}; placing it again"
    out.event("Rescheduling", f"left node {node}: {message}", warning=True)
    out.condition(cond.SCHEDULED, False, reason, message)
    out.phase_to(Phase.PENDING, reason, message)
    log.warning(
        "placement cleared", namespace=target.namespace, name=target.name, uid=target.uid,
        node=node, reason=reason, why=why,
    )  # fmt: skip
    rt.kick(target.uid, "unbound")  # placed again by the next pass, not the next resync
    return True


def placement_of(item: Mapping[str, Any]) -> Placement | None:
    node = (item.get("status") or {}).get("nodeName")
    if not node:
        return None
    meta = item["metadata"]
    return Placement(str(node), request_of(item["spec"]), meta["namespace"], meta["name"])


def _report(out: StatusWriter, target: Target, machine: pb.Machine) -> None:
    phase = _PHASE.get(machine.state, Phase.UNKNOWN)
    node = out.current.get("nodeName") or out.patch.status.get("nodeName")
    message = machine.message or f"{phase.value} on node {node}"
    if machine.state == pb.MACHINE_STATE_FAILED and machine.log_tail:
        message = f"{message}; last log lines:\n{machine.log_tail[-1500:]}"
    running = machine.state == pb.MACHINE_STATE_RUNNING
    paused = machine.state == pb.MACHINE_STATE_PAUSED
    # Running means the VMM runs; Ready waits for our init's hand-over in container mode.
    # A VM-mode guest boots its own init, which has no marker to wait for.
    booted = machine.boot_duration_seconds > 0 or machine.boot_mode != pb.BOOT_MODE_CONTAINER
    settled = (
        machine.generation == target.generation and machine.state != pb.MACHINE_STATE_PROVISIONING
    )
    reason = machine.reason or phase.value
    provisioned = machine.state not in (pb.MACHINE_STATE_PROVISIONING, pb.MACHINE_STATE_FAILED)
    # Each condition carries the generation it describes: what the node runs, which lags
    # the spec while a new generation is being provisioned.
    running_generation = int(machine.generation)
    out.condition(cond.PROVISIONED, provisioned, reason, message, running_generation)
    if running and not booted:
        out.condition(
            cond.READY, False, "Booting", "the VM runs; its guest has not spoken yet",
            running_generation,
        )  # fmt: skip
    else:
        out.condition(cond.READY, running, reason, message, running_generation)
    out.condition(
        cond.PAUSED,
        paused,
        "Paused" if paused else "NotPaused",
        "vCPUs are paused" if paused else "vCPUs run",
        running_generation,
    )
    if machine.boot_mode in _BOOT:
        out.set("bootMode", _BOOT[machine.boot_mode].value)
    private = [
        n
        for n in machine.interfaces
        if n.network not in (PUBLIC_NETWORK, PLANETARY_NETWORK, MYCELIUM_NETWORK)
    ]
    if private:
        out.set("ip", private[0].ip or None)
        out.set("ipv6", private[0].ipv6 or None)
    public = next((n for n in machine.interfaces if n.network == PUBLIC_NETWORK), None)
    ygg = next((n for n in machine.interfaces if n.network == PLANETARY_NETWORK), None)
    out.set("planetaryIP", (ygg.ipv6 or None) if ygg else None)
    myc = next((n for n in machine.interfaces if n.network == MYCELIUM_NETWORK), None)
    out.set("myceliumIP", (myc.ipv6 or None) if myc else None)
    out.set("publicIP", (public.ip or None) if public else None)
    out.set("publicIPv6", (public.ipv6 or None) if public else None)
    if machine.restarts > int(out.current.get("restartCount") or 0):
        out.event("Restarted", f"the node restarted the VM ({machine.restarts} so far)", True)
    out.set("restartCount", machine.restarts)
    if machine.HasField("exit_code"):
        out.set("exitCode", machine.exit_code)
        out.set("exitReason", machine.exit_reason)
    if settled:
        out.set("observedGeneration", target.generation)
    if phase == Phase.RUNNING and out.phase != Phase.RUNNING.value and machine.restarts == 0:
        _observe_time_to_running(target)
    out.phase_to(phase, reason, message)


def _observe_time_to_running(target: Target) -> None:
    if not target.created:
        return
    created = datetime.datetime.fromisoformat(target.created)
    elapsed = datetime.datetime.now(datetime.UTC) - created
    metrics.TIME_TO_RUNNING.observe(elapsed.total_seconds())


async def _sample_metrics(
    agent: Any,
    target: Target,
    out: StatusWriter,
    logger: structlog.stdlib.BoundLogger,
    interval: float,
) -> None:
    """A coarse snapshot in status (the live figures are the agent's /metrics): at most
    one status write per `interval` per Zmachine for it."""
    previous = (out.current.get("metrics") or {}).get("sampledAt")
    now = datetime.datetime.now(datetime.UTC)
    if previous:
        taken = datetime.datetime.fromisoformat(str(previous))
        if (now - taken).total_seconds() < interval:
            return
    try:
        stats = await agent.stats(target.uid)
    except ControllerError as exc:
        logger.info("stats unavailable", error=str(exc))
        return
    out.set(
        "metrics",
        {
            "cpuSeconds": round(stats.vcpu_seconds, 3),
            "memoryBytes": stats.vmm_rss_bytes,
            "netRxBytes": stats.net_rx_bytes,
            "netTxBytes": stats.net_tx_bytes,
            "diskReadBytes": stats.block_read_bytes,
            "diskWriteBytes": stats.block_write_bytes,
            "sampledAt": cond.format_time(now),
        },
    )


FORCE_DELETE_ANNOTATION = "zos.threefold.io/force-delete"


class DeletionPending(ControllerError):
    """The node has not confirmed the deletion yet; the finalizer stays."""

    reason = "DeletionPending"


async def release(
    rt: Runtime,
    target: Target,
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    out: StatusWriter,
) -> None:
    """Remove the machine from its node; the finalizer goes only when that is confirmed,
    forced by annotation, or the node has been unreachable past the delete timeout."""
    logger = log.bind(namespace=target.namespace, name=target.name, uid=target.uid)
    async with rt.locks[target.uid]:
        # Our own placement first: a Deploy may have gone out after the body was read.
        node_name = rt.inventory.node_of(target.uid) or status.get("nodeName")
        if not node_name:
            rt.inventory.forget_zmachine(target.uid)
            return
        if (meta.get("annotations") or {}).get(FORCE_DELETE_ANNOTATION) == "true":
            out.event(
                "ForceDeleted",
                f"released without asking node {node_name}; it may keep "
                "leftovers until its agent is cleaned",
                warning=True,
            )
            rt.inventory.forget_zmachine(target.uid)
            return
        node = rt.inventory.nodes.get(node_name)
        problem = f"node {node_name} is not Ready"
        if node is not None and node.ready:
            try:
                existed = await rt.agents.client(node.address).delete(target.uid)
            except ControllerError as exc:
                problem = str(exc)
            else:
                logger.info("deleted on node", node=node_name, existed=existed)
                rt.inventory.forget_zmachine(target.uid)
                return
        if node_name in rt.inventory.deleted_nodes:
            # Nobody is left to confirm; should the node's agent come back, what it still
            # runs for this uid is an orphan there and is collected.
            out.event(
                "NodeDeleted",
                f"released at once: node {node_name} was deleted (its ZmachineNode is gone)",
                warning=True,
            )
            rt.inventory.forget_zmachine(target.uid)
            return
        waited = age_seconds(meta.get("deletionTimestamp"))
        if waited >= rt.delete_timeout:
            out.event(
                "DeleteTimeout",
                f"released after {waited:.0f}s without confirmation from "
                f"node {node_name} ({problem}); it may keep leftovers",
                warning=True,
            )
            rt.inventory.forget_zmachine(target.uid)
            return
        raise DeletionPending(
            f"waiting for node {node_name} to confirm deletion ({problem}); released anyway "
            f"after {rt.delete_timeout:.0f}s, or now with annotation {FORCE_DELETE_ANNOTATION}=true"
        )
