"""What `helm uninstall` cannot delete itself: the registrations the agents created at run time.

The chart's post-delete hook runs this once the release's objects are gone. The agents made
their ZmachineNodes and heartbeat Leases, and the controller its leader-election Lease, so
Helm never knew them. An agent still terminating would register again, so this first waits
until no agent pod of the release is left, then deletes the ZmachineNodes whose Leases live in
the release namespace and those Leases. Zmachines are left alone: they are the users' objects.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import structlog
from kubernetes import client

from controller.agent.registration import lease_name
from controller.api.zmachinenode import PLURAL
from controller.kube import GROUP, VERSION, ApiException, api_client, get_object
from controller.logs import configure_logging
from controller.operator.errors import ControllerError
from controller.operator.leader import LEASE_NAME

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)


class AgentsStillRunning(ControllerError):
    """Agent pods outlived the wait: their registrations would come back if deleted now."""

    reason = "AgentsStillRunning"


def remove_registrations(
    api: client.ApiClient,
    namespace: str,
    agent_selector: str,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Delete the release's ZmachineNodes and Leases; returns the nodes removed."""
    core = client.CoreV1Api(api)
    deadline = clock() + timeout
    while pods := core.list_namespaced_pod(namespace, label_selector=agent_selector).items:
        if clock() > deadline:
            names = [p.metadata.name for p in pods if p.metadata]
            raise AgentsStillRunning(f"agent pods in {namespace} still running: {names}")
        time.sleep(1.0)

    custom = client.CustomObjectsApi(api)
    nodes = get_object(custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
    ours = [
        n["metadata"]["name"]
        for n in nodes
        if (n.get("spec") or {}).get("leaseNamespace") == namespace
    ]
    coordination = client.CoordinationV1Api(api)
    for name in ours:
        _ignore_gone(partial(custom.delete_cluster_custom_object, GROUP, VERSION, PLURAL, name))
        _ignore_gone(partial(coordination.delete_namespaced_lease, lease_name(name), namespace))
        log.info("removed ZmachineNode and its Lease", node=name, namespace=namespace)
    _ignore_gone(partial(coordination.delete_namespaced_lease, LEASE_NAME, namespace))
    return ours


def _ignore_gone(delete: Callable[[], object]) -> None:
    try:
        delete()
    except ApiException as exc:
        if exc.status != 404:
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.operator.uninstall",
        description="Remove the agents' registrations after `helm uninstall` (the chart's hook).",
    )
    parser.add_argument("--namespace", required=True, help="the release namespace")
    parser.add_argument(
        "--agent-selector", required=True, help="label selector of the release's agent pods"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for agents")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        removed = remove_registrations(
            api_client(), args.namespace, args.agent_selector, args.timeout
        )
    except (ControllerError, ApiException) as exc:
        log.error("uninstall cleanup failed", namespace=args.namespace, error=str(exc))
        return 1
    log.info("uninstall cleanup done", namespace=args.namespace, nodes=removed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
