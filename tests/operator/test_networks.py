"""ZmachineNetworks in the controller: a /24 per node written at placement, the spec's ip
checked against the range and the node's subnet, deletion held while the network is used.

Placement runs the real `converge` against the real API server with recording agents
(tests/operator/doubles.py); the deletion test runs the real controller."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from controller.agent.network import addressing
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import networks
from tests.operator.conftest import RunningController, wait_for
from tests.operator.doubles import World, agents, run_converge


def _apply_network(world: World, name: str, **spec: Any) -> dict[str, Any]:
    manifest = {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "ZmachineNetwork",
        "metadata": {"name": name, "namespace": world.ns},
        "spec": {"ipRange": "10.20.0.0/16", **spec},
    }
    world.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    found = world.cluster.get("zmnet", name, world.ns)
    assert found is not None
    return found


@pytest.fixture
def office(world: World) -> Iterator[str]:
    _apply_network(world, "office")
    yield "office"
    world.cluster.kubectl("-n", world.ns, "delete", "zmnet", "office", "--ignore-not-found",
                          "--wait=false")  # fmt: skip
    world.cluster.kubectl("-n", world.ns, "patch", "zmnet", "office", "--type=merge", "-p",
                          json.dumps({"metadata": {"finalizers": None}}), check=False)  # fmt: skip


def _nic(network: str, ip: str | None = None) -> dict[str, Any]:
    return {"interfaces": [{"network": network, **({"ip": ip} if ip else {})}]}


def _subnets(world: World, network: str) -> dict[str, str]:
    found = world.cluster.get("zmnet", network, world.ns)
    assert found is not None
    return {s["node"]: s["subnet"] for s in (found.get("status") or {}).get("subnets") or []}


def _next_free_ports(world: World, node: str, count: int) -> list[int]:
    """The overlay ports the next `count` networks on `node` should get: the API server is
    shared, so networks of other tests (the end-to-end one) may hold the first ones."""
    found = json.loads(world.cluster.kubectl("get", "zmnet", "-A", "-o", "json").stdout)
    used = {
        int(s["listenPort"])
        for item in found["items"]
        for s in (item.get("status") or {}).get("subnets") or []
        if s["node"] == node
    }
    return [p for p in range(networks.FIRST_PORT, 65536) if p not in used][:count]


def test_missing_network_keeps_the_zmachine_pending(world: World, named: str, events: Any) -> None:
    fleet, rt, _ = world.deployed(named, network=_nic("nowhere"))
    out = asyncio.run(run_converge(rt, world.body(named)))
    assert out.patch.status["phase"] == "Pending"
    assert f"ZmachineNetwork {world.ns}/nowhere does not exist" in out.patch.status["message"]
    assert "spec.network.interfaces[0].network" in out.patch.status["message"]
    assert not any(a.deploys for a in fleet.by_address.values())


def test_each_node_gets_its_own_subnet_and_the_agent_learns_it(
    world: World, office: str, events: Any
) -> None:
    fleet = agents()
    rt = world.runtime(fleet)
    first = {node: _next_free_ports(world, node, 1)[0] for node in ("node-a", "node-b")}
    bodies = [
        world.create(f"net-a-{i}", network=_nic(office), nodeName=node)
        for i, node in enumerate(("node-a", "node-b", "node-a"))
    ]
    try:
        for body in bodies:
            asyncio.run(run_converge(rt, body))
        subnets = _subnets(world, office)
        assert set(subnets) == {"node-a", "node-b"}
        assert subnets["node-a"] != subnets["node-b"]
        network = world.cluster.get("zmnet", office, world.ns)
        assert network is not None
        prefix = ipaddress.IPv6Network(network["status"]["ipv6Prefix"])
        assert prefix == addressing.derived_ipv6_prefix(network["metadata"]["uid"])
        for body, node in zip(bodies, ("node-a", "node-b", "node-a"), strict=True):
            sent = fleet.by_address[node].specs[body["metadata"]["uid"]].interfaces
            assert len(sent) == 1
            nic = sent[0]
            assert (nic.network, nic.subnet, nic.ip_range) == (
                office,
                subnets[node],
                "10.20.0.0/16",
            )
            assert nic.network_id == network["metadata"]["uid"]
            assert nic.ipv6_subnet == str(
                addressing.ipv6_subnet(prefix, ipaddress.IPv4Network(subnets[node]))
            )
            assert nic.ip == ""  # the node's IPAM picks it
        ports = {s["node"]: s["listenPort"] for s in network["status"]["subnets"]}
        assert ports == first  # one network: the first free port on each node
        # The peers each node is told: the other node, its /24, /64 and overlay address.
        net, pushes = networks.Network.of(network), networks.PeerPushes()
        uid = network["metadata"]["uid"]
        asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
        (peer,) = fleet.by_address["node-a"].peers[uid]
        assert peer.public_key == "key-of-node-b"
        assert peer.endpoint == f"192.0.2.2:{first['node-b']}"
        b = ipaddress.IPv4Network(subnets["node-b"])
        assert list(peer.allowed_ips) == [
            str(b), str(addressing.ipv6_subnet(prefix, b)),
            f"100.64.{b.network_address.packed[1]}.{b.network_address.packed[2]}/32",
        ]  # fmt: skip

        # Told again only what changed, what a node did not have, or what is old.
        def told() -> set[str]:
            return {n for n in ("node-a", "node-b") if fleet.by_address[n].peers.pop(uid, None)}

        told()
        asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
        assert told() == set()  # both acknowledged exactly this
        rt.inventory.nodes["node-b"].underlay = "192.0.2.22"  # node-b moved: node-a hears it
        asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
        assert told() == {"node-a"}
        fleet.by_address["node-b"].has_networks = False  # node-b lost its state
        pushes.acked[(uid, "node-b")] = (pushes.acked[(uid, "node-b")][0], 0.0)  # refresh due
        for _ in range(2):  # asked until it has the network again
            asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
            assert told() == {"node-b"}
        fleet.by_address["node-b"].has_networks = True
        asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
        asyncio.run(networks.push_peers(net, rt.inventory.nodes, fleet, pushes))
        assert told() == {"node-b"}
        pushes.forget(network_uid=uid)
        assert not pushes.acked
    finally:
        for body in bodies:
            world.cleanup(body["metadata"]["name"])


def test_an_ip_places_the_zmachine_on_the_node_serving_its_subnet(
    world: World, office: str, events: Any
) -> None:
    fleet = agents()
    rt = world.runtime(fleet)
    first = world.create("net-ip-first", network=_nic(office, "10.20.7.5"), nodeName="node-b")
    second = world.create("net-ip-second", network=_nic(office, "10.20.7.6"))
    third = world.create("net-ip-third", network=_nic(office, "10.20.7.7"), nodeName="node-a")
    try:
        asyncio.run(run_converge(rt, first))
        assert _subnets(world, office) == {"node-b": "10.20.7.0/24"}
        # Unpinned: node-a is less loaded, but only node-b serves 10.20.7.0/24.
        asyncio.run(run_converge(rt, second))
        assert world.body("net-ip-second")["status"]["nodeName"] == "node-b"
        sent = fleet.by_address["node-b"].specs[second["metadata"]["uid"]].interfaces[0]
        assert (sent.ip, sent.subnet) == ("10.20.7.6", "10.20.7.0/24")
        # Pinned to the other node: refused with the reason, nothing deployed there.
        out = asyncio.run(run_converge(rt, third))
        assert out.patch.status["phase"] == "Pending"
        assert "node node-a (spec.nodeName) cannot take 10.20.7.0/24" in out.patch.status["message"]
        assert "node node-b has it" in out.patch.status["message"]
        assert not fleet.by_address["node-a"].deploys
    finally:
        for name in ("net-ip-first", "net-ip-second", "net-ip-third"):
            world.cleanup(name)


def test_a_second_network_on_a_node_gets_the_next_port(world: World, events: Any) -> None:
    _apply_network(world, "first", ipRange="10.40.0.0/16")
    _apply_network(world, "second", ipRange="10.40.0.0/16")  # overlapping ranges are fine
    expected = _next_free_ports(world, "node-a", 2)
    fleet = agents()
    rt = world.runtime(fleet)
    bodies = [
        world.create(f"port-{n}", network=_nic(n), nodeName="node-a") for n in ("first", "second")
    ]
    try:
        for body in bodies:
            asyncio.run(run_converge(rt, body))
        ports = [
            (world.cluster.get("zmnet", n, world.ns) or {})["status"]["subnets"][0]["listenPort"]
            for n in ("first", "second")
        ]
        assert ports == expected
    finally:
        for body in bodies:
            world.cleanup(body["metadata"]["name"])
        for n in ("first", "second"):
            world.cluster.kubectl("-n", world.ns, "delete", "zmnet", n, "--wait=false")


def test_a_node_without_overlay_is_not_chosen(world: World, office: str, events: Any) -> None:
    fleet = agents()
    rt = world.runtime(fleet)
    rt.inventory.nodes["node-a"].wireguard_key = ""
    body = world.create("no-overlay", network=_nic(office))
    try:
        asyncio.run(run_converge(rt, body))
        assert world.body("no-overlay")["status"]["nodeName"] == "node-b"
        pinned = world.create("no-overlay-pinned", network=_nic(office), nodeName="node-a")
        out = asyncio.run(run_converge(rt, pinned))
        assert "has no overlay for private networks" in out.patch.status["message"]
    finally:
        world.cleanup("no-overlay")
        world.cleanup("no-overlay-pinned")


def test_mycelium_goes_to_nodes_with_routers_with_its_seed_and_reports_its_address(
    world: World, office: str, events: Any
) -> None:
    fleet = agents()
    rt = world.runtime(fleet)
    rt.inventory.nodes["node-a"].mycelium = True
    net = {**_nic(office), "mycelium": {"network": office, "hexSeed": "A1B2C3D4E5F6"}}
    body = world.create("myc-one", network=net)
    pinned = world.create("myc-pinned", network=net, nodeName="node-b")
    try:
        asyncio.run(run_converge(rt, body))
        assert world.body("myc-one")["status"]["nodeName"] == "node-a"  # node-b has no router
        uid = body["metadata"]["uid"]
        assert fleet.by_address["node-a"].specs[uid].mycelium_seed == "a1b2c3d4e5f6"
        out = asyncio.run(run_converge(rt, pinned))
        assert out.patch.status["phase"] == "Pending"
        assert "node node-b (spec.nodeName) has no mycelium router" in out.patch.status["message"]

        # The node's address of the machine is reported, and not taken for the private one.
        machine = fleet.by_address["node-a"].machines[uid]
        machine.interfaces.extend([
            pb.InterfaceStatus(network=office, ip="10.20.1.2"),
            pb.InterfaceStatus(network="mycelium", ipv6="4a1:2:3:4:ff0f:a1b2:c3d4:e5f6"),
        ])  # fmt: skip
        out = asyncio.run(run_converge(rt, world.body("myc-one")))
        assert out.patch.status["myceliumIP"] == "4a1:2:3:4:ff0f:a1b2:c3d4:e5f6"
        assert out.patch.status["ip"] == "10.20.1.2"
    finally:
        world.cleanup("myc-one")
        world.cleanup("myc-pinned")


def test_an_ip_outside_the_range_fails_with_the_field(
    world: World, office: str, named: str, events: Any
) -> None:
    fleet, rt, _ = world.deployed(named, network=_nic(office, "10.99.0.5"))
    out = asyncio.run(run_converge(rt, world.body(named)))
    assert out.patch.status["phase"] == "Failed"
    assert (
        "spec.network.interfaces[0].ip 10.99.0.5 is outside the range 10.20.0.0/16"
        in (out.patch.status["message"])
    )
    assert not any(a.deploys for a in fleet.by_address.values())


def test_a_full_range_leaves_new_nodes_unschedulable(world: World, events: Any) -> None:
    _apply_network(world, "tiny", ipRange="10.30.5.0/24")
    fleet = agents()
    rt = world.runtime(fleet)
    a = world.create("tiny-a", network=_nic("tiny"), nodeName="node-a")
    b = world.create("tiny-b", network=_nic("tiny"), nodeName="node-b")
    try:
        asyncio.run(run_converge(rt, a))
        out = asyncio.run(run_converge(rt, b))
        assert _subnets(world, "tiny") == {"node-a": "10.30.5.0/24"}
        assert out.patch.status["phase"] == "Pending"
        assert "network tiny has no free /24 left" in out.patch.status["message"]
        assert not fleet.by_address["node-b"].deploys
    finally:
        world.cleanup("tiny-a")
        world.cleanup("tiny-b")
        world.cluster.kubectl("-n", world.ns, "delete", "zmnet", "tiny", "--wait=false")


def test_deleting_a_network_in_use_waits_for_its_zmachines(
    world: World, controller: RunningController
) -> None:
    """The real controller (kopf, finalizer): the network stays, saying who uses it."""
    _apply_network(world, "busy")
    world.create("busy-user", network=_nic("busy"), nodeName="nowhere")
    # The controller's finalizer comes with its first look at the network: only then is
    # deletion its to hold (a network deleted before the controller ever saw it just goes).
    wait_for(
        lambda: ((world.cluster.get("zmnet", "busy", world.ns) or {}).get("status") or {}).get(
            "machines"
        ) == 1,
        what="the controller to count the network's Zmachine",
    )  # fmt: skip
    world.cluster.kubectl("-n", world.ns, "delete", "zmnet", "busy", "--wait=false")

    def held() -> bool:
        found = world.cluster.get("zmnet", "busy", world.ns)
        conds = ((found or {}).get("status") or {}).get("conditions") or []
        return any(
            c["type"] == "InUse" and c["status"] == "True" and "busy-user" in c["message"]
            for c in conds
        )

    wait_for(held, what="the deletion held with an InUse condition")
    assert world.cluster.get("zmnet", "busy", world.ns) is not None
    world.cleanup("busy-user")
    wait_for(
        lambda: world.cluster.get("zmnet", "busy", world.ns) is None,
        what="the network deleted once unused",
    )
