"""Level-based reconciliation of one Zmachine against what its node agent reports."""

from __future__ import annotations

import asyncio
import datetime
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from controller.agent.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.api import conditions as cond
from controller.api.zmachine import BootMode, Phase, ZmachineSpec
from controller.operator import metrics
from controller.operator.agents import AgentPool
from controller.operator.errors import (
    AgentRejected,
    ControllerError,
    SecretUnavailable,
    UnsupportedSpec,
)
from controller.operator.inventory import Inventory, Placement, request_of
from controller.operator.placement import choose_node
from controller.operator.status import StatusWriter
from controller.operator.translate import (
    SecretReader,
    agent_spec,
    env_to_deploy,
    refuse_unsupported,
)

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

METRICS_INTERVAL = datetime.timedelta(seconds=30)
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


@dataclass
class Runtime:
    """What every handler shares: the inventory, agent clients and the API readers."""

    inventory: Inventory
    agents: AgentPool
    read_secret: SecretReader
    list_placements: Callable[[], list[tuple[str, Placement]]]
    delete_timeout: float = 300.0
    placements_seeded: bool = False
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))


@dataclass
class Target:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str | None

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> Target:
        return cls(
            str(meta["namespace"]),
            str(meta["name"]),
            str(meta["uid"]),
            int(meta.get("generation") or 1),
            meta.get("creationTimestamp"),
        )

    def ref(self) -> pb.ZmachineRef:
        return pb.ZmachineRef(namespace=self.namespace, name=self.name, uid=self.uid)


async def converge(
    rt: Runtime, target: Target, raw_spec: Mapping[str, Any], out: StatusWriter
) -> None:
    """Bring the node in line with the spec, then report what the node says."""
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
        node_name = out.current.get("nodeName")
        if not node_name:
            node_name = await _place(rt, target, raw_spec, spec, out)
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

        node = rt.inventory.nodes.get(node_name)
        if node is None or not node.ready:
            out.condition(
                cond.NODE_READY,
                False,
                "NodeNotReady",
                f"node {node_name} stopped renewing its Lease",
            )
            out.condition(cond.READY, None, "NodeNotReady", f"node {node_name} is not Ready")
            out.phase_to(
                Phase.UNKNOWN, "NodeNotReady", f"node {node_name} is not Ready; state unknown"
            )
            return
        out.condition(cond.NODE_READY, True, "NodeReady", f"node {node_name} is Ready")
        agent = rt.agents.client(node.address)
        try:
            machine = await agent.get(target.uid)
            env = await asyncio.to_thread(
                env_to_deploy, spec, target.namespace, target.generation, machine, rt.read_secret
            )
            if env is not None:
                response = await agent.deploy(
                    target.ref(), target.generation, agent_spec(spec, target.name, env)
                )
                machine = response.machine
                if response.changed:
                    out.event("Deployed", f"generation {target.generation} sent to {node_name}")
                    logger.info("deployed", node=node_name, generation=target.generation)
            assert machine is not None  # env_to_deploy deploys whenever the agent had none
        except SecretUnavailable as exc:
            out.condition(cond.PROVISIONED, False, exc.reason, str(exc))
            out.phase_to(Phase.PENDING, exc.reason, str(exc))
            return
        except AgentRejected as exc:
            out.condition(cond.PROVISIONED, False, exc.reason, str(exc))
            out.condition(cond.READY, False, exc.reason, str(exc))
            out.phase_to(Phase.FAILED, exc.reason, str(exc))
            return
        except ControllerError as exc:
            logger.warning("agent call failed", node=node_name, error=str(exc))
            out.set("message", f"node {node_name}: {exc}")
            return
        _report(out, target, machine)
        if machine.state in (pb.MACHINE_STATE_RUNNING, pb.MACHINE_STATE_PAUSED):
            await _sample_metrics(agent, target, out, logger)


async def _place(
    rt: Runtime, target: Target, raw_spec: Mapping[str, Any], spec: ZmachineSpec, out: StatusWriter
) -> str | None:
    async with rt.placement_lock:
        if not rt.placements_seeded:
            # The watch may not have delivered every placed Zmachine yet right after start:
            # count what the API says once; from then on the watch and our own reservations do.
            for uid, placement in await asyncio.to_thread(rt.list_placements):
                rt.inventory.placements[uid] = placement
            rt.placements_seeded = True
        decision = choose_node(
            rt.inventory, request_of(raw_spec), spec.node_selector, pinned=spec.node_name
        )
        if decision.node is None:
            out.set("observedGeneration", target.generation)
            out.condition(cond.SCHEDULED, False, decision.reason, decision.message)
            out.phase_to(Phase.PENDING, decision.reason, decision.message)
            return None
        rt.inventory.placements[target.uid] = Placement(
            decision.node, request_of(raw_spec), target.namespace, target.name
        )
    out.set("nodeName", decision.node)
    out.condition(cond.SCHEDULED, True, decision.reason, decision.message)
    out.phase_to(Phase.SCHEDULED, decision.reason, decision.message)
    return decision.node


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
    out.condition(cond.PROVISIONED, provisioned, reason, message)
    if running and not booted:
        out.condition(cond.READY, False, "Booting", "the VM runs; its guest has not spoken yet")
    else:
        out.condition(cond.READY, running, reason, message)
    out.condition(
        cond.PAUSED,
        paused,
        "Paused" if paused else "NotPaused",
        "vCPUs are paused" if paused else "vCPUs run",
    )
    if machine.boot_mode in _BOOT:
        out.set("bootMode", _BOOT[machine.boot_mode].value)
    if machine.interfaces and machine.interfaces[0].ip:
        out.set("ip", machine.interfaces[0].ip)
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
    agent: Any, target: Target, out: StatusWriter, logger: structlog.stdlib.BoundLogger
) -> None:
    previous = (out.current.get("metrics") or {}).get("sampledAt")
    now = datetime.datetime.now(datetime.UTC)
    if previous:
        taken = datetime.datetime.fromisoformat(str(previous))
        if now - taken < METRICS_INTERVAL:
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
        node_name = status.get("nodeName")
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
        deleting_since = meta.get("deletionTimestamp")
        waited = 0.0
        if deleting_since:
            since = datetime.datetime.fromisoformat(str(deleting_since))
            waited = (datetime.datetime.now(datetime.UTC) - since).total_seconds()
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
