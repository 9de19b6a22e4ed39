"""ZmachineNode liveness: a node whose Lease goes stale is marked not Ready."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import structlog
from kubernetes import client

from controller.agent.registration import lease_name
from controller.api import conditions as cond
from controller.api.zmachinenode import LEASE_NAMESPACE_DEFAULT
from controller.kube import ApiException, LeaseObserver

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

# Agents run on other hosts: their Leases are judged by our monotonic clock since each last
# changed, not by their renewTime against our wall clock (the two clocks may disagree).
_observer = LeaseObserver()


def lease_fresh(coordination: client.CoordinationV1Api, node: str, spec: Mapping[str, Any]) -> bool:
    namespace = str(spec.get("leaseNamespace") or LEASE_NAMESPACE_DEFAULT)
    try:
        lease = coordination.read_namespaced_lease(lease_name(node), namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return not _observer.expired(lease)


def readiness_patch(
    name: str, status: Mapping[str, Any], fresh: bool, body: kopf.Body
) -> list[dict[str, Any]] | None:
    """New conditions when the Lease says the node went away; None when nothing changes.

    Only the controller turns Ready false; the agent turns it true with each heartbeat.
    """
    existing = list(status.get("conditions") or [])
    ready = cond.get_condition(existing, "Ready")
    if fresh or (ready is not None and ready.get("status") == "False"):
        return None
    log.warning("node lease expired", node=name)
    kopf.event(
        body,
        type="Warning",
        reason="NodeNotReady",
        message=f"node {name} stopped renewing its Lease",
    )
    return cond.set_condition(
        existing, "Ready", False, "LeaseExpired", "the agent stopped renewing its Lease", None
    )
