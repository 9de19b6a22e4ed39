"""The node monitor: Lease freshness by observation, and orphan collection that removes only
VMs the API server confirms have no Zmachine placed on their node."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controller.agent.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator.nodes import LeaseWatch, NodeMonitor
from tests.operator.doubles import World


def test_a_lease_is_fresh_while_its_record_changes() -> None:
    watch = LeaseWatch()
    assert watch.fresh("n", "1", 0.3)  # first sight: a full duration, as after a restart
    time.sleep(0.2)
    assert watch.fresh("n", "2", 0.3)  # renewed
    time.sleep(0.2)
    assert watch.fresh("n", "2", 0.3)  # 0.2 s since the change we saw
    time.sleep(0.2)
    assert not watch.fresh("n", "2", 0.3)
    assert not watch.fresh("n", None, 0.3)  # no Lease at all


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
