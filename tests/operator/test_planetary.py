"""Planetary in the controller: only nodes running a Yggdrasil router are candidates, each
pass tells the node's router whom to dial (every other Ready node with one), the spec
sent asks for the NIC, and the node's planetary address lands in status.planetaryIP.

The real `converge` against the real API server, with recording agents."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from tests.operator.doubles import World, agents, run_converge

PLANETARY = {"planetary": True}


def test_planetary_nodes_peers_and_address(world: World, events: Any) -> None:
    fleet = agents()
    rt = world.runtime(fleet)
    rt.inventory.nodes["node-a"].planetary_peer = "tls://192.0.2.1:9943"
    body = world.create("ygg-one", network=PLANETARY)
    pinned = world.create("ygg-pinned", network=PLANETARY, nodeName="node-b")
    try:
        asyncio.run(run_converge(rt, body))
        assert world.body("ygg-one")["status"]["nodeName"] == "node-a"  # node-b has no router
        uid = body["metadata"]["uid"]
        assert fleet.by_address["node-a"].specs[uid].planetary
        assert fleet.by_address["node-a"].planetary_peers == []  # nobody else to dial yet
        out = asyncio.run(run_converge(rt, pinned))
        assert out.patch.status["phase"] == "Pending"
        assert "node node-b (spec.nodeName) has no Yggdrasil router" in out.patch.status["message"]

        # node-b gets a router: the next pass tells node-a to dial it; the node's address
        # of the machine is reported, and not taken for the private one.
        rt.inventory.nodes["node-b"].planetary_peer = "tls://192.0.2.2:9943"
        machine = fleet.by_address["node-a"].machines[uid]
        machine.interfaces.append(pb.InterfaceStatus(network="ygg", ipv6="300:1:2:3::5"))
        out = asyncio.run(run_converge(rt, world.body("ygg-one")))
        assert fleet.by_address["node-a"].planetary_peers == ["tls://192.0.2.2:9943"]
        assert out.patch.status["planetaryIP"] == "300:1:2:3::5"
        assert "ip" not in out.patch.status
    finally:
        world.cleanup("ygg-one")
        world.cleanup("ygg-pinned")
