"""The node monitor's orphan collection: it removes only VMs the API server confirms have no
Zmachine placed on their node. Lease freshness by observation is tested with the elector's
(tests/operator/test_leader_elector.py), which shares it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import yaml

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator.inventory import Request
from controller.operator.nodes import NodeMonitor
from controller.operator.placement import choose_node
from tests.operator.doubles import World, agents

GI = 1024**3


def _vm(namespace: str, name: str, uid: str) -> pb.Machine:
    ref = pb.ZmachineRef(namespace=namespace, name=name, uid=uid)
    return pb.Machine(ref=ref, generation=1, state=pb.MACHINE_STATE_RUNNING)


def test_orphans_are_removed_only_when_the_api_confirms(
    world: World, named: str, events: list[Any]
) -> None:
    fleet, _, body = world.deployed(named, nodeName="node-a")
    uid = body["metadata"]["uid"]
    node_a, node_b = fleet.by_address["node-a"], fleet.by_address["node-b"]
    node_a.machines["ghost-uid"] = _vm(world.ns, "ghost", "ghost-uid")  # its Zmachine is gone
    node_a.machines["other-ns"] = _vm("not-watched", "x", "other-ns")  # another controller's
    node_b.machines[uid] = _vm(world.ns, named, uid)  # a copy on the wrong node

    patient = NodeMonitor(world.runtime(fleet), namespaces=[world.ns], orphan_grace=60)
    for node in ("node-a", "node-b"):
        view = patient.rt.inventory.nodes[node]
        assert asyncio.run(patient.collect_orphans(view)) == []  # suspects, not yet orphans

    # A controller just restarted knows no placement: the API server must be asked first.
    monitor = NodeMonitor(world.runtime(fleet), namespaces=[world.ns], orphan_grace=0)
    removed_a = asyncio.run(monitor.collect_orphans(monitor.rt.inventory.nodes["node-a"]))
    removed_b = asyncio.run(monitor.collect_orphans(monitor.rt.inventory.nodes["node-b"]))
    assert removed_a == ["ghost-uid"]
    assert removed_b == [uid]
    assert sorted(node_a.machines) == sorted([uid, "other-ns"])
    assert node_b.machines == {}
    assert monitor.rt.inventory.node_of(uid) == "node-a"


def test_placement_waits_for_a_lease_renewed_since_start(world: World, events: list[Any]) -> None:
    """At start a Ready condition may be a dead agent's last word: a node takes Zmachines
    once the monitor has seen its Lease renewed."""
    name = "renewing-node"
    lease = {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": f"zmachine-node-{name}", "namespace": world.ns},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 600,
                 "renewTime": "2026-01-01T00:00:00.000000Z"},
    }  # fmt: skip
    world.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(lease))
    rt = world.runtime(agents())
    rt.inventory.nodes.clear()
    ready = [{"type": "Ready", "status": "True"}]
    status = {"allocatable": {"cpu": 4, "memory": "8Gi"}, "conditions": ready}
    rt.inventory.observe_node(name, {}, {"address": "node-a", "leaseNamespace": world.ns}, status)
    monitor = NodeMonitor(rt, namespaces=[world.ns])
    asyncio.run(monitor.tick())
    assert choose_node(rt.inventory, Request(1, GI), {}).node is None
    renewed = json.dumps({"spec": {"renewTime": "2026-01-01T00:00:10.000000Z"}})
    world.cluster.kubectl("-n", world.ns, "patch", "lease", f"zmachine-node-{name}",
                          "--type=merge", "-p", renewed)  # fmt: skip
    asyncio.run(monitor.tick())
    assert choose_node(rt.inventory, Request(1, GI), {}).node == name
