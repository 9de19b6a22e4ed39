"""A node that is registered and heartbeating but whose agent does not answer.

No agent listens at the node's address (a closed loopback port), so every call fails the way
a cut network does; the test renews the node's Lease every 2 s, as an agent would.
"""

from __future__ import annotations

import datetime
import json
import threading

import yaml

from hack.controlplane import ControlPlane, free_port
from tests.api.test_admission import valid_manifest
from tests.operator.conftest import RunningController, wait_for


def register_ghost_node(cluster: ControlPlane, name: str) -> None:
    node = {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "ZmachineNode",
        "metadata": {"name": name},
        "spec": {"address": f"127.0.0.1:{free_port()}", "leaseNamespace": "zmachine-system"},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(node))
    status = {"status": {
        "allocatable": {"cpu": 8, "memory": "16Gi"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }}  # fmt: skip
    cluster.kubectl("patch", "zmn", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps(status))  # fmt: skip
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": f"zmachine-node-{name}", "namespace": "zmachine-system"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 3600,
                 "renewTime": "2099-01-01T00:00:00.000000Z"},
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(lease))


def renew_ghost_lease(cluster: ControlPlane, name: str) -> None:
    """A heartbeat, as the agent's: the controller places only on nodes it sees renewing."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.kubectl("patch", "lease", "-n", "zmachine-system", f"zmachine-node-{name}",
                    "--type=merge", "-p", json.dumps({"spec": {"renewTime": now}}))  # fmt: skip


def test_unreachable_agent_is_reported_and_force_delete_releases(
    cluster: ControlPlane, ns: str, controller: RunningController
) -> None:
    register_ghost_node(cluster, "ghost")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(2):
            renew_ghost_lease(cluster, "ghost")

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        stranded_then_forced(cluster, ns)
    finally:
        stop.set()
        beating.join(10)
        cluster.kubectl("delete", "zmn", "ghost", "--wait=false")
        cluster.kubectl("delete", "lease", "-n", "zmachine-system", "zmachine-node-ghost")


def stranded_then_forced(cluster: ControlPlane, ns: str) -> None:
    manifest = valid_manifest("stranded", ns)
    manifest["spec"]["nodeName"] = "ghost"
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(manifest))

    obj = wait_for(
        lambda: (
            (o := cluster.get("zm", "stranded", ns))
            and "ghost" in str((o.get("status") or {}).get("message"))
            and "UNAVAILABLE" in str(o["status"]["message"])
            and o
        ),
        what="the failed agent call in status.message",
    )
    assert obj["status"]["nodeName"] == "ghost"
    # Nothing is known of the machine: the phase and Ready say so instead of keeping old values.
    assert obj["status"]["phase"] == "Unknown"
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "AgentUnreachable")

    cluster.kubectl("delete", "-n", ns, "zm", "stranded", "--wait=false")
    held = wait_for(
        lambda: (
            (o := cluster.get("zm", "stranded", ns))
            and "waiting for node ghost to confirm deletion" in str(o["status"].get("message"))
            and o
        ),
        what="the finalizer to hold the object",
    )
    assert held["status"]["phase"] == "Terminating"
    assert "zos.threefold.io/force-delete=true" in held["status"]["message"]

    cluster.kubectl("annotate", "-n", ns, "zm", "stranded", "zos.threefold.io/force-delete=true")
    wait_for(lambda: cluster.get("zm", "stranded", ns) is None, what="the forced release")
    events = cluster.kubectl(
        "get", "-n", ns, "events", "--field-selector", "involvedObject.name=stranded", "-o", "json"
    ).stdout
    assert "ForceDeleted" in events
