"""The reconcile worker: Pending Zmachines wait for capacity, not for a timer; per-object
state goes with the object; node state goes with the node. Real API server, recording
agent doubles (tests/operator/doubles.py), the real Worker, handlers and AgentPool."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import kopf

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import handlers, metrics
from controller.operator.agents import AgentPool
from controller.operator.inventory import NodeView
from controller.operator.nodes import NodeMonitor
from controller.operator.reconcile import Runtime
from controller.operator.worker import SECRET_RESYNC_SECONDS, Worker
from tests.operator.doubles import GI, FakeNodeAgent, World, agents


def _kicks(cause: str) -> float:
    return float(metrics.KICKS.labels(cause=cause)._value.get())


def _handler(fn: object) -> Any:
    """A kopf handler called as kopf would (its decorator types it for kopf alone)."""
    return fn


async def _drain(worker: Worker) -> None:
    """Run the queue until it is empty and nothing is in flight."""
    while worker.queued or worker.active:
        uid = await worker.queue.get()
        worker.queued.discard(uid)
        worker.active.add(uid)
        try:
            await worker.reconcile(uid)
        finally:
            worker.active.discard(uid)
        if uid in worker.again:
            worker.again.discard(uid)
            worker.kick(uid, "again")


def _phase(world: World, name: str) -> str | None:
    return (world.body(name).get("status") or {}).get("phase")


def test_pending_zmachine_is_placed_when_a_node_joins_not_before(world: World, named: str) -> None:
    fleet = agents()
    fleet.by_address["node-c"] = FakeNodeAgent("node-c")
    # 16Gi fits neither 8Gi node: Pending until a bigger node registers.
    body = world.create(named, computeCapacity={"cpu": 1, "memory": "16Gi"})
    uid = body["metadata"]["uid"]
    rt = world.runtime(fleet)
    worker = Worker(rt)

    async def scenario() -> None:
        worker.observe(body)
        await _drain(worker)
        assert _phase(world, named) == "Pending"
        assert rt.pending == {uid}
        # Changes that bring no room (a node already known, unchanged) do not retry it...
        before = _kicks("capacity")
        rt.inventory.observe_node(
            "node-a", {}, {"address": "node-a"},
            {"allocatable": {"cpu": 4, "memory": "8Gi"},
             "conditions": [{"type": "Ready", "status": "True"}]},
        )  # fmt: skip
        assert _kicks("capacity") == before and not worker.queued
        # ...a node that joins does, at once.
        rt.inventory.observe_node(
            "node-c", {"uid": "c"}, {"address": "node-c"},
            {"allocatable": {"cpu": 8, "memory": "32Gi"},
             "conditions": [{"type": "Ready", "status": "True"}]},
        )  # fmt: skip
        rt.inventory.nodes["node-c"].renewing = True
        assert _kicks("capacity") == before + 1 and uid in worker.queued
        await _drain(worker)

    asyncio.run(scenario())
    assert fleet.running(uid) == ["node-c"]
    assert world.body(named)["status"]["nodeName"] == "node-c"
    assert rt.pending == set()


def test_a_placement_going_away_retries_the_pending(world: World, named: str) -> None:
    """A node full of the first Zmachine; the second waits until the first is deleted."""
    fleet = agents()
    first = world.create(f"{named}-1", computeCapacity={"cpu": 1, "memory": "6Gi"})
    second = world.create(f"{named}-2", computeCapacity={"cpu": 1, "memory": "6Gi"})
    rt = world.runtime(fleet)
    del rt.inventory.nodes["node-b"]  # one 8Gi node: room for one of them
    worker = Worker(rt)
    try:

        async def scenario() -> None:
            worker.observe(first)
            await _drain(worker)
            worker.observe(second)
            await _drain(worker)
            assert _phase(world, f"{named}-2") == "Pending"
            assert rt.inventory.used("node-a").memory == 6 * GI
            # The first goes away (what the DELETED watch event does).
            rt.forget(first["metadata"]["uid"])
            worker.forget(first["metadata"]["uid"])
            await _drain(worker)

        asyncio.run(scenario())
        assert world.body(f"{named}-2")["status"]["nodeName"] == "node-a"
        assert rt.inventory.used("node-a").memory == 6 * GI
    finally:
        world.cleanup(f"{named}-1")
        world.cleanup(f"{named}-2")


def _empty_per_uid(rt: Runtime, worker: Worker, uid: str) -> list[str]:
    """Every per-object map that still holds `uid`."""
    held = {
        "locks": uid in rt.locks,
        "avoid": uid in rt.avoid,
        "retries": uid in rt.retries,
        "pending": uid in rt.pending,
        "placements": uid in rt.inventory.placements,
        "bodies": uid in worker.bodies,
        "resync schedule": uid in worker.due,
        "again": uid in worker.again,
    }
    return [name for name, present in held.items() if present]


def test_deletion_prunes_every_per_object_entry(world: World, named: str) -> None:
    fleet = agents()
    body = world.create(named)
    uid = body["metadata"]["uid"]
    rt = world.runtime(fleet)
    worker = Worker(rt)
    monitor = NodeMonitor(rt)
    memo = kopf.Memo(runtime=rt, worker=worker, monitor=monitor)

    async def scenario() -> None:
        await _event(memo, "ADDED", body)
        await _drain(worker)
        node = world.body(named)["status"]["nodeName"]
        rt.machines.put(node, fleet.by_address[node].machines[uid])
        rt.avoid[uid] = {"node-x": 1e12}
        assert uid in rt.locks and uid in worker.bodies and uid in worker.due
        await _event(memo, "DELETED", world.body(named))

    asyncio.run(scenario())
    assert _empty_per_uid(rt, worker, uid) == []
    assert rt.inventory.placements.totals == {}  # the per-node totals went with it
    # The node still reports the VM (no Deleted event from it yet): it stays in the machine
    # cache, where orphan collection finds it; the agent's Deleted event prunes it.
    assert any(uid in m for m in rt.machines.nodes.values())


async def _event(memo: kopf.Memo, type_: str, body: dict[str, Any]) -> None:
    await _handler(handlers.track_zmachine)(
        memo=memo, event={"type": type_}, body=body, meta=body["metadata"],
        spec=body["spec"], status=body.get("status") or {},
    )  # fmt: skip


def test_node_deletion_stops_its_stream_and_closes_its_client(world: World) -> None:
    pool = AgentPool(tls_dir=None)
    rt = world.runtime(agents())
    rt.agents = pool
    rt.inventory.nodes.clear()
    monitor = NodeMonitor(rt)
    memo = kopf.Memo(runtime=rt, worker=Worker(rt), monitor=monitor)
    # Nothing listens there: the stream retries with backoff until the node goes.
    status = {
        "allocatable": {"cpu": 2, "memory": "4Gi"},
        "conditions": [{"type": "Ready", "status": "True"}],
    }

    async def scenario() -> None:
        for type_ in ("ADDED", "MODIFIED"):
            await _handler(handlers.track_node)(
                memo=memo, event={"type": type_}, name="node-z",
                meta={"name": "node-z", "uid": "z"}, spec={"address": "127.0.0.1:9"},
                status=status,
            )  # fmt: skip
        task = monitor.watches.tasks["node-z"][1]
        await asyncio.sleep(0.3)  # the stream task dials (and fails, and backs off)
        assert len(monitor.watches.tasks) == 1 and len(pool._clients) == 1
        await _handler(handlers.track_node)(
            memo=memo, event={"type": "DELETED"}, name="node-z",
            meta={"name": "node-z"}, spec={}, status={},
        )  # fmt: skip
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()

    asyncio.run(scenario())
    assert monitor.watches.tasks == {} and pool._clients == {}
    assert "node-z" not in rt.machines.nodes and "node-z" not in rt.inventory.nodes


def test_incremental_totals_match_a_recount(tmp_path: Path) -> None:
    """The per-node totals kept on every change equal a full recount."""
    from controller.operator.inventory import Inventory, Placement, Request

    inv = Inventory()
    inv.nodes["a"] = NodeView("a", "a", cores=4, memory=8 * GI, ready=True)
    for i in range(50):
        inv.placements[str(i)] = Placement(
            "ab"[i % 2], Request(1 + i % 3, GI * (1 + i % 2)), "n", "x"
        )
    for i in range(0, 50, 3):
        inv.forget_zmachine(str(i))
    for i in range(1, 50, 5):  # moved: replaced in place
        inv.placements[str(i)] = Placement("a", Request(2, GI), "n", "x")
    inv.placements.setdefault("1", Placement("b", Request(9, GI), "n", "x"))  # kept
    for node in ("a", "b"):
        here = [p.request for p in inv.placements.values() if p.node == node]
        assert inv.used(node) == Request(sum(r.cpu for r in here), sum(r.memory for r in here))
        assert inv.count_on(node) == len(here)


def test_a_zmachine_reading_a_secret_is_resynced_sooner(world: World, named: str) -> None:
    """Secrets are not watched: one whose env reads a Secret is looked at again within about
    SECRET_RESYNC_SECONDS (a changed value rolls out then); the others at the safety net."""
    reads = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "t"}}}]
    plain = world.create(f"{named}-plain")
    secret = world.create(f"{named}-secret", env=reads)
    worker = Worker(world.runtime(agents()))
    try:
        now = time.monotonic()
        worker.observe(plain)
        worker.observe(secret)
        assert worker.due[secret["metadata"]["uid"]] - now <= SECRET_RESYNC_SECONDS * 1.5 + 1
        assert worker.due[plain["metadata"]["uid"]] - now >= worker.resync_period * 0.5 - 1
    finally:
        world.cleanup(f"{named}-plain")
        world.cleanup(f"{named}-secret")


def test_the_first_pass_writes_the_status_once_with_the_placement(world: World, named: str) -> None:
    """Everything the first pass learns (the node, the console URL, that the node is
    Ready) goes out in the placement's write: no second status write before the node's
    answer comes back (docs/benchmarks.md, writes per Zmachine)."""
    fleet = agents()
    for node in ("node-a", "node-b"):
        fleet.by_address[node] = FakeNodeAgent(node, deploy_state=pb.MACHINE_STATE_PROVISIONING)
    body = world.create(named)
    uid = body["metadata"]["uid"]
    rt = world.runtime(fleet)
    worker = Worker(rt)
    writes = metrics.STATUS_WRITES._value.get()

    async def scenario() -> None:
        worker.observe(body)
        await _drain(worker)

    asyncio.run(scenario())
    assert fleet.running(uid), "not deployed"
    status = world.body(named)["status"]
    assert status["phase"] == "Provisioning" and status["nodeName"] in ("node-a", "node-b")
    assert status["consoleURL"].endswith(f"/{named}/console")
    assert any(c["type"] == "NodeReady" and c["status"] == "True" for c in status["conditions"])
    assert metrics.STATUS_WRITES._value.get() == writes, "a status write after the placement"
