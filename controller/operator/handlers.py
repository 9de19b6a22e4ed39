"""kopf handlers: kopf only watches Zmachines and ZmachineNodes. The worker
(controller.operator.worker) converges and deletes Zmachines when something changed, and
the node monitor judges nodes. Admission already checked the spec.

No kopf change handler is registered: kopf would add its own bookkeeping writes to every
object (a last-handled-configuration annotation per change); the worker keeps the finalizer
itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import structlog

from controller.agent.network import addressing
from controller.api.zmachine import GROUP, PLURAL, VERSION
from controller.api.zmachinenetwork import PLURAL as NETWORK_PLURAL
from controller.api.zmachinenode import PLURAL as NODE_PLURAL
from controller.operator import metrics, networks
from controller.operator.nodes import NodeMonitor
from controller.operator.reconcile import Runtime
from controller.operator.status import StatusWriter
from controller.operator.worker import Worker

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

# How often each ZmachineNetwork's overlay peers and options are pushed to its nodes.
NETWORK_SYNC_SECONDS = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own identity, so that other kopf operators on the cluster never collide with us.
    # Not the worker's finalizer: kopf removes its own from objects no handler of its needs.
    settings.persistence.finalizer = f"{GROUP}/kopf"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are posted explicitly on transitions; kopf's per-handler chatter is not useful.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track_zmachine(
    memo: kopf.Memo,
    event: Mapping[str, Any],
    body: kopf.Body,
    meta: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    **_: Any,
) -> None:
    """Async, like every handler here: kopf runs sync handlers in threads, and these
    dicts are read by the event loop."""
    uid = str(meta.get("uid"))
    worker: Worker = memo["worker"]
    if event.get("type") == "DELETED":
        metrics.PHASES.observe(uid, None)
        _runtime(memo).forget(uid)
        worker.forget(uid)
        return
    metrics.PHASES.observe(uid, status.get("phase"))
    _runtime(memo).inventory.observe_zmachine(uid, meta, spec, status.get("nodeName"))
    worker.observe(body)


@kopf.on.event(GROUP, VERSION, NODE_PLURAL)
async def track_node(
    memo: kopf.Memo,
    event: Mapping[str, Any],
    name: str,
    meta: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    monitor: NodeMonitor = memo["monitor"]
    if event.get("type") == "DELETED":
        node = runtime.inventory.nodes.get(name)
        runtime.inventory.forget_node(name)
        runtime.peer_pushes.forget(node=name)
        monitor.watches.stop(name)
        if node is not None:
            await runtime.agents.forget(node.address)
        runtime.kick_node(name, "node")
        log.warning("node deleted", node=name)
    else:
        was = runtime.inventory.nodes.get(name)
        runtime.inventory.observe_node(name, meta, spec, status)
        node = runtime.inventory.nodes[name]
        if node.address:
            monitor.watches.ensure(name, node.address)
        if was is not None and was.ready != node.ready:
            runtime.kick_node(name, "node")


IN_USE = "InUse"


@kopf.on.create(GROUP, VERSION, NETWORK_PLURAL)
@kopf.on.resume(GROUP, VERSION, NETWORK_PLURAL)
@kopf.timer(
    GROUP,
    VERSION,
    NETWORK_PLURAL,
    interval=NETWORK_SYNC_SECONDS,
    initial_delay=NETWORK_SYNC_SECONDS,
)
async def network_status(
    memo: kopf.Memo,
    meta: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """The IPv6 prefix in use and the Zmachines on the network (subnets are written by
    placement, see controller/operator/networks.py)."""
    if meta.get("deletionTimestamp"):
        return
    prefix = spec.get("ipv6Prefix") or str(addressing.derived_ipv6_prefix(str(meta["uid"])))
    worker: Worker = memo["worker"]
    names = networks.cached_users(worker.bodies.values(), str(meta["namespace"]), str(meta["name"]))
    out = StatusWriter(body, status, patch, int(meta.get("generation") or 1))
    out.set("ipv6Prefix", prefix)
    out.set("machines", len(names))
    out.condition(
        IN_USE, bool(names), "Used" if names else "Unused",
        f"used by {', '.join(names)}" if names else "no Zmachine uses it",
    )  # fmt: skip
    if status.get("subnets"):
        rt = _runtime(memo)
        network = networks.Network.of({"metadata": meta, "spec": spec, "status": status})
        await networks.push_peers(network, rt.inventory.nodes, rt.agents, rt.peer_pushes)


@kopf.on.delete(GROUP, VERSION, NETWORK_PLURAL)
async def network_delete(
    memo: kopf.Memo,
    meta: Mapping[str, Any],
    status: Mapping[str, Any],
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """Deletion waits (the finalizer stays) while a Zmachine of the namespace uses it; the
    nodes drop their part of it with the last Zmachine they ran on it."""
    namespace, name = str(meta["namespace"]), str(meta["name"])
    names = await networks.users(_runtime(memo).kube, namespace, name)
    if names:
        message = f"used by Zmachines {', '.join(names)}; deleted once they are gone"
        out = StatusWriter(body, status, patch, int(meta.get("generation") or 1))
        out.condition(IN_USE, True, "Used", message)
        out.set("machines", len(names))
        raise kopf.TemporaryError(
            f"ZmachineNetwork {namespace}/{name} is {message}", delay=NETWORK_SYNC_SECONDS
        )
    _runtime(memo).peer_pushes.forget(network_uid=str(meta.get("uid")))
    log.info("network released", namespace=namespace, network=name, uid=meta.get("uid"))


@kopf.on.startup()
async def start_background(memo: kopf.Memo, **_: Any) -> None:
    monitor: NodeMonitor = memo["monitor"]
    worker: Worker = memo["worker"]
    memo["tasks"] = [
        asyncio.create_task(worker.run(), name="reconcile worker"),
        asyncio.create_task(monitor.run(worker.synced), name="node monitor"),
    ]


@kopf.on.cleanup()
async def stop_background(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.get("tasks") or []:
        task.cancel()
    monitor: NodeMonitor = memo["monitor"]
    monitor.watches.stop_all()
