"""converge, placement and release under the races that once deployed one uid twice
(the agents are recording doubles; see tests/operator/doubles.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from kopf._core.engines import posting

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import reconcile
from controller.operator.errors import NodeOutOfCapacity
from tests.operator.doubles import World, agents, run_converge, run_release


def test_restart_between_deploy_and_status_patch_deploys_once(
    world: World, named: str, events: list[Any]
) -> None:
    fleet = agents()
    body = world.create(named)
    # The first controller deploys and dies before kopf writes its patch.
    asyncio.run(run_converge(world.runtime(fleet), body))
    # Its successor starts with an empty memory and the object as the API server has it.
    asyncio.run(run_converge(world.runtime(fleet), world.body(named)))
    uid = body["metadata"]["uid"]
    assert fleet.running(uid) == [world.body(named)["status"]["nodeName"]]
    assert sum(len(a.deploys) for a in fleet.by_address.values()) == 1


@pytest.mark.parametrize("controllers", [1, 2], ids=["two-handlers", "two-controllers"])
def test_concurrent_handlers_on_one_stale_body_place_once(
    world: World, named: str, events: list[Any], controllers: int
) -> None:
    """Two handlers of one controller, or two controllers that each believe they lead (one
    about to be fenced), on the same body: only one placement may stand."""
    fleet = agents()
    body = world.create(named)
    first = world.runtime(fleet)
    second = first if controllers == 1 else world.runtime(fleet)
    if controllers == 2:
        # Each sees the other's node as busy, so they would pick different nodes.
        first.inventory.nodes["node-b"].ready = False
        second.inventory.nodes["node-a"].ready = False

    async def both() -> None:
        await asyncio.gather(run_converge(first, body), run_converge(second, body))

    asyncio.run(both())
    uid = body["metadata"]["uid"]
    assert fleet.running(uid) == [world.body(named)["status"]["nodeName"]]


def test_delete_during_the_first_deploy_leaves_nothing(
    world: World, named: str, events: list[Any]
) -> None:
    fleet = agents()
    body = world.create(named)
    rt = world.runtime(fleet)

    async def scenario() -> None:
        gate = asyncio.Event()
        for agent in fleet.by_address.values():
            agent.gate, agent.called = gate, asyncio.Event()
        deploying = asyncio.create_task(run_converge(rt, body))
        await asyncio.wait(
            [asyncio.create_task(a.called.wait()) for a in fleet.by_address.values()],
            return_when=asyncio.FIRST_COMPLETED,
        )
        await asyncio.to_thread(world.delete, named)
        # The delete handler's body predates the placement: no status.nodeName in it.
        releasing = asyncio.create_task(run_release(rt, body))
        await asyncio.sleep(0.2)
        gate.set()
        await asyncio.gather(deploying, releasing)

    asyncio.run(scenario())
    assert fleet.running(body["metadata"]["uid"]) == []


def test_a_stale_timer_after_delete_deploys_nothing(
    world: World, named: str, events: list[Any]
) -> None:
    fleet = agents()
    body = world.create(named)
    world.delete(named)  # the finalizer keeps it, with a deletionTimestamp
    asyncio.run(run_converge(world.runtime(fleet), body))  # a body from before the delete
    assert sum(len(a.deploys) for a in fleet.by_address.values()) == 0


def test_out_of_capacity_places_elsewhere_with_an_event(
    world: World, named: str, events: list[posting.K8sEvent]
) -> None:
    fleet = agents()
    body = world.create(named)
    rt = world.runtime(fleet)
    rt.inventory.nodes["node-b"].ready = False  # so node-a is chosen first
    fleet.by_address["node-a"].refuse = NodeOutOfCapacity("agent at node-a: no memory")
    asyncio.run(run_converge(rt, body))
    assert "nodeName" not in (world.body(named).get("status") or {})
    assert any(e.reason == "Rescheduling" for e in events)
    rt.inventory.nodes["node-b"].ready = True
    asyncio.run(run_converge(rt, world.body(named)))
    assert fleet.running(body["metadata"]["uid"]) == ["node-b"]


def test_a_resize_that_does_not_fit_keeps_the_old_generation(
    world: World, named: str, events: list[Any]
) -> None:
    fleet, rt, body = world.deployed(named, nodeName="node-a")
    world.cluster.kubectl(
        "-n", world.ns, "patch", "zm", named, "--type=merge",
        "-p", json.dumps({"spec": {"computeCapacity": {"cpu": 2, "memory": "64Gi"}}}),
    )  # fmt: skip
    rt.inventory.observe_zmachine(
        body["metadata"]["uid"], body["metadata"], world.body(named)["spec"], "node-a"
    )
    out = asyncio.run(run_converge(rt, world.body(named)))
    assert fleet.by_address["node-a"].deploys == [(body["metadata"]["uid"], 1)]
    provisioned = next(c for c in out.conditions if c["type"] == "Provisioned")
    assert provisioned["reason"] == "ResizeUnschedulable", provisioned
    ready = next(c for c in out.conditions if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1


def test_an_unreachable_agent_makes_ready_unknown(
    world: World, named: str, events: list[Any]
) -> None:
    fleet, rt, _ = world.deployed(named, nodeName="node-a")
    fleet.by_address["node-a"].unreachable = True
    out = asyncio.run(run_converge(rt, world.body(named)))
    ready = next(c for c in out.conditions if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "AgentUnreachable")
    assert out.phase == "Unknown"


def test_a_lost_node_loses_its_unpinned_zmachines(
    world: World, named: str, events: list[posting.K8sEvent]
) -> None:
    fleet, rt, body = world.deployed(named)
    first = world.body(named)["status"]["nodeName"]
    rt.node_lost_timeout = 0.0
    rt.inventory.mark_unready(first)
    asyncio.run(run_converge(rt, world.body(named)))  # cleared and placed again at once
    assert any(e.reason == "Rescheduling" for e in events)
    other = world.body(named)["status"]["nodeName"]
    assert other != first
    assert other in fleet.running(body["metadata"]["uid"])


def test_a_lost_node_keeps_its_pinned_zmachines(
    world: World, named: str, events: list[posting.K8sEvent]
) -> None:
    _, rt, _ = world.deployed(named, nodeName="node-a")
    rt.node_lost_timeout = 0.0
    rt.inventory.forget_node("node-a")
    out = asyncio.run(run_converge(rt, world.body(named)))
    assert world.body(named)["status"]["nodeName"] == "node-a"
    node_ready = next(c for c in out.conditions if c["type"] == "NodeReady")
    assert node_ready["reason"] == "NodeDeleted" and "spec.nodeName" in node_ready["message"]
    assert out.phase == "Unknown"


def test_a_failed_provisioning_is_deployed_again_with_backoff(
    world: World, named: str, events: list[posting.K8sEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent undoes a failed provisioning and keeps the record FAILED/ProvisionFailed;
    only the controller can try again, and it does, later and later."""
    monkeypatch.setattr(reconcile, "RETRY_BASE_SECONDS", 1.0)  # wide: a loaded machine
    fleet, rt, body = world.deployed(named, nodeName="node-a")
    agent, uid = fleet.by_address["node-a"], body["metadata"]["uid"]

    def fail() -> None:
        agent.machines[uid].state = pb.MACHINE_STATE_FAILED
        agent.machines[uid].reason = reconcile.PROVISION_FAILED

    fail()
    asyncio.run(run_converge(rt, world.body(named)))
    assert len(agent.deploys) == 1  # just seen failed: not at once
    time.sleep(1.2)
    asyncio.run(run_converge(rt, world.body(named)))
    assert len(agent.deploys) == 2
    fail()
    asyncio.run(run_converge(rt, world.body(named)))
    assert len(agent.deploys) == 2  # the second retry waits twice as long
    time.sleep(2.2)
    asyncio.run(run_converge(rt, world.body(named)))
    assert len(agent.deploys) == 3
