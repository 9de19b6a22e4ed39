"""kopf handlers: Zmachines are converged on every change and every few seconds; nodes are
tracked from their watch and judged by the node monitor. Admission already checked the spec."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic
import structlog

from controller.agent.network import addressing
from controller.api import conditions as cond
from controller.api.zmachine import GROUP, PLURAL, VERSION, Phase
from controller.api.zmachinenetwork import PLURAL as NETWORK_PLURAL
from controller.api.zmachinenode import PLURAL as NODE_PLURAL
from controller.operator import metrics, networks
from controller.operator.errors import ControllerError
from controller.operator.nodes import NodeMonitor
from controller.operator.reconcile import Runtime, Target, converge, release
from controller.operator.status import StatusWriter

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

FINALIZER = f"{GROUP}/finalizer"
RESYNC_SECONDS = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own identity, so that other kopf operators on the cluster never collide with us.
    settings.persistence.finalizer = FINALIZER
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


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def reconcile(
    memo: kopf.Memo,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    body: kopf.Body,
    patch: kopf.Patch,
    **kwargs: Any,
) -> None:
    """On every change, and every few seconds even without one, so that what the node
    reports is compared with the spec (a timer call has no `reason`)."""
    if meta.get("deletionTimestamp"):
        return
    started = time.monotonic()
    target = Target.of(meta)
    out = StatusWriter(body, status, patch, target.generation)
    result = "error"
    try:
        await converge(_runtime(memo), target, spec, out)
        result = "ok"
    except pydantic.ValidationError as exc:
        message = f"spec is invalid: {_first_error(exc)}"
        out.condition(cond.READY, False, "InvalidSpec", message)
        out.phase_to(Phase.FAILED, "InvalidSpec", message)
        result = "invalid"
    except ControllerError as exc:
        out.set("message", str(exc))
    finally:
        metrics.RECONCILES.labels(result=result).inc()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    trigger = str(kwargs.get("reason") or "resync")
    level = log.debug if trigger == "resync" else log.info
    level(
        "reconciled",
        namespace=target.namespace,
        name=target.name,
        uid=target.uid,
        trigger=trigger,
        phase=out.phase,
        result=result,
    )


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(
    memo: kopf.Memo,
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    target = Target.of(meta)
    out = StatusWriter(body, status, patch, target.generation)
    out.set("phase", Phase.TERMINATING.value)
    try:
        await release(_runtime(memo), target, status, meta, out)
    except ControllerError as exc:
        out.set("message", str(exc))
        raise kopf.TemporaryError(str(exc), delay=RESYNC_SECONDS) from exc
    log.info("released", namespace=target.namespace, name=target.name, uid=target.uid)
    out.event("Deleted", "everything on the node is gone")


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track_zmachine(
    memo: kopf.Memo,
    event: Mapping[str, Any],
    meta: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    **_: Any,
) -> None:
    """Async, like every handler here: kopf runs sync handlers in threads, and these
    dicts are read by the event loop."""
    uid = str(meta.get("uid"))
    if event.get("type") == "DELETED":
        metrics.PHASES.observe(uid, None)
        _runtime(memo).forget(uid)
        return
    metrics.PHASES.observe(uid, status.get("phase"))
    _runtime(memo).inventory.observe_zmachine(uid, meta, spec, status.get("nodeName"))


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
    if event.get("type") == "DELETED":
        node = runtime.inventory.nodes.get(name)
        runtime.inventory.forget_node(name)
        if node is not None:
            await runtime.agents.forget(node.address)
        log.warning("node deleted", node=name)
    else:
        runtime.inventory.observe_node(name, meta, spec, status)


IN_USE = "InUse"


@kopf.on.create(GROUP, VERSION, NETWORK_PLURAL)
@kopf.on.resume(GROUP, VERSION, NETWORK_PLURAL)
@kopf.timer(GROUP, VERSION, NETWORK_PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
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
    names = await networks.users(_runtime(memo).kube, str(meta["namespace"]), str(meta["name"]))
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
        await networks.push_peers(network, rt.inventory.nodes, rt.agents)


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
            f"ZmachineNetwork {namespace}/{name} is {message}", delay=RESYNC_SECONDS
        )
    log.info("network released", namespace=namespace, network=name, uid=meta.get("uid"))


@kopf.on.startup()
async def start_node_monitor(memo: kopf.Memo, **_: Any) -> None:
    monitor: NodeMonitor = memo["monitor"]
    memo["monitor_task"] = asyncio.create_task(monitor.run(), name="node monitor")


@kopf.on.cleanup()
async def stop_node_monitor(memo: kopf.Memo, **_: Any) -> None:
    task: asyncio.Task[None] | None = memo.get("monitor_task")
    if task is not None:
        task.cancel()


def _first_error(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"spec.{where}: {err['msg']}"
