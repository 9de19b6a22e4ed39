"""Test doubles for the controller's unit tests: node agents that record calls.

The real `converge`, `release` and `StatusWriter` run against the real API server; only the
node agents are doubles (`RecordingAgents`), because these tests decide the interleaving of
agent calls to the millisecond, which real agents cannot be made to do. The real agents and
VMMs are exercised under faults in tests/faults and end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
import yaml
from kopf._core.engines import posting

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator.errors import AgentUnavailable
from controller.operator.inventory import Inventory, NodeView
from controller.operator.kubeapi import Kube
from controller.operator.reconcile import Runtime, Target, converge, release
from controller.operator.status import StatusWriter
from hack.controlplane import ControlPlane
from tests.api.test_admission import valid_manifest

GI = 1024**3


@dataclass
class FakeNodeAgent:
    """One node's agent, as the controller sees it through AgentPool.client()."""

    node: str
    machines: dict[str, pb.Machine] = field(default_factory=dict)
    deploys: list[tuple[str, int]] = field(default_factory=list)
    specs: dict[str, pb.ZmachineSpec] = field(default_factory=dict)  # last one sent per uid
    peers: dict[str, list[pb.WireguardPeer]] = field(default_factory=dict)  # per network uid
    planetary_peers: list[str] = field(default_factory=list)  # the last ApplyPlanetary
    has_networks: bool = True  # ApplyNetwork says the node has the network
    deletes: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None  # set: Deploy proceeds; unset: Deploy waits on it
    refuse: Exception | None = None
    unreachable: bool = False
    called: asyncio.Event = field(default_factory=asyncio.Event)  # a Deploy came in
    # What Deploy answers: Running at once, or Provisioning (in the background) as a
    # real agent does for a first deployment.
    deploy_state: pb.MachineState.ValueType = pb.MACHINE_STATE_RUNNING

    async def get(self, uid: str) -> pb.Machine | None:
        if self.unreachable:
            raise AgentUnavailable(f"agent of {self.node} did not answer Get")
        return self.machines.get(uid)

    async def deploy(
        self, ref: pb.ZmachineRef, generation: int, spec: pb.ZmachineSpec
    ) -> pb.DeployResponse:
        self.deploys.append((ref.uid, generation))
        self.specs[ref.uid] = spec
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse is not None:
            raise self.refuse
        machine = pb.Machine(
            ref=ref, generation=generation, state=self.deploy_state,
            boot_mode=pb.BOOT_MODE_VM,
        )  # fmt: skip
        self.machines[ref.uid] = machine
        return pb.DeployResponse(machine=machine, changed=True)

    async def delete(self, uid: str) -> bool:
        self.deletes.append(uid)
        return self.machines.pop(uid, None) is not None

    async def list(self) -> list[pb.Machine]:
        return list(self.machines.values())

    async def apply_network(
        self, network_id: str, peers: Sequence[pb.WireguardPeer], network: pb.NetworkInterface
    ) -> pb.ApplyNetworkResponse:
        assert network.network_id == network_id
        self.peers[network_id] = list(peers)
        return pb.ApplyNetworkResponse(present=self.has_networks)

    async def apply_planetary(self, peers: Sequence[str]) -> pb.ApplyPlanetaryResponse:
        self.planetary_peers = list(peers)
        return pb.ApplyPlanetaryResponse(running=bool(self.machines))

    async def stats(self, uid: str) -> pb.MachineStats:
        return pb.MachineStats(uid=uid)


@dataclass
class RecordingAgents:
    """Test double of AgentPool: one FakeNodeAgent per node address."""

    by_address: dict[str, FakeNodeAgent]

    def client(self, address: str) -> FakeNodeAgent:
        return self.by_address[address]

    def running(self, uid: str) -> list[str]:
        return [a.node for a in self.by_address.values() if uid in a.machines]


def _inventory() -> Inventory:
    inventory = Inventory()
    for name in ("node-a", "node-b"):
        inventory.nodes[name] = NodeView(
            name, name, cores=4, memory=8 * GI, ready=True,
            wireguard_key=f"key-of-{name}", underlay=f"192.0.2.{len(inventory.nodes) + 1}",
        )  # fmt: skip
    return inventory


class EventLog(asyncio.Queue[posting.K8sEvent]):
    """Where kopf.event puts Events in these tests, instead of posting them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[posting.K8sEvent] = []

    def put_nowait(self, item: posting.K8sEvent) -> None:
        self.seen.append(item)


@dataclass
class World:
    cluster: ControlPlane
    ns: str
    kube: Kube

    def runtime(self, agents: RecordingAgents, inventory: Inventory | None = None) -> Runtime:
        """A controller's memory: a fresh one is a restarted controller."""
        return Runtime(
            inventory=inventory or _inventory(),
            agents=agents,  # type: ignore[arg-type]
            read_secret=lambda ns, name: None,
            kube=self.kube,
            node_lost_timeout=600,
        )

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        manifest = valid_manifest(name, self.ns)
        manifest["spec"].update(spec)
        manifest["metadata"]["finalizers"] = ["zos.threefold.io/finalizer"]
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        return self.body(name)

    def deployed(self, name: str, **spec: Any) -> tuple[RecordingAgents, Runtime, dict[str, Any]]:
        """A Zmachine created and converged once by a fresh controller on fresh agents."""
        fleet = agents()
        body = self.create(name, **spec)
        rt = self.runtime(fleet)
        asyncio.run(run_converge(rt, body))
        return fleet, rt, body

    def body(self, name: str) -> dict[str, Any]:
        found = self.cluster.get("zm", name, self.ns)
        assert found is not None
        return found

    def delete(self, name: str) -> None:
        self.cluster.kubectl("-n", self.ns, "delete", "zm", name, "--wait=false")

    def cleanup(self, name: str) -> None:
        patch = json.dumps({"metadata": {"finalizers": None}})
        self.cluster.kubectl("-n", self.ns, "patch", "zm", name, "--type=merge", "-p", patch,
                             check=False)  # fmt: skip
        self.cluster.kubectl("-n", self.ns, "delete", "zm", name, "--ignore-not-found")


def agents() -> RecordingAgents:
    return RecordingAgents({n: FakeNodeAgent(n) for n in ("node-a", "node-b")})


async def run_converge(rt: Runtime, body: dict[str, Any]) -> StatusWriter:
    """One handler call on `body`; its end-of-handler patch is returned, not applied."""
    posting.event_queue_loop_var.set(asyncio.get_running_loop())
    out = StatusWriter(
        kopf.Body(cast(kopf.RawBody, body)), body.get("status") or {}, kopf.Patch(), None
    )
    out.generation = int(body["metadata"]["generation"])
    await converge(rt, Target.of(body["metadata"]), body["spec"], out)
    out.flush()
    return out


async def run_release(rt: Runtime, body: dict[str, Any]) -> None:
    posting.event_queue_loop_var.set(asyncio.get_running_loop())
    out = StatusWriter(
        kopf.Body(cast(kopf.RawBody, body)), body.get("status") or {}, kopf.Patch(), None
    )
    await release(rt, Target.of(body["metadata"]), body.get("status") or {}, body["metadata"], out)
