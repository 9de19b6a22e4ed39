"""Public addresses in the controller: a ZmachinePublicIPPool's addresses taken at
placement (recorded in its status), only on nodes with a public interface, refused when
the pool is empty, given back on delete (through the real delete handler) and when the
spec drops publicIP.

Placement runs the real `converge` against the real API server with recording agents
(tests/operator/doubles.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf._core.engines import posting

from controller.operator.worker import Worker
from tests.operator.doubles import World, agents, run_converge

PUBLIC = {"publicIP": True}


@pytest.fixture
def pool(world: World) -> Iterator[str]:
    """One address of each family: the second Zmachine finds the pool empty. Cluster-scoped
    and the API server is shared: a name of its own, and no other pool may hold addresses
    (other tests' pools are removed by their own fixtures)."""
    name = f"pool-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "zos.threefold.io/v1alpha1",
        "kind": "ZmachinePublicIPPool",
        "metadata": {"name": name},
        "spec": {
            "ipv4": {
                "subnet": "203.0.113.0/24",
                "gateway": "203.0.113.1",
                "addresses": ["203.0.113.10"],
            },
            "ipv6": {
                "subnet": "2001:db8:1::/64",
                "gateway": "2001:db8:1::1",
                "addresses": ["2001:db8:1::10"],
            },
        },
    }
    world.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    yield name
    world.cluster.kubectl("delete", "zmpool", name, "--ignore-not-found")


def _status(world: World, pool: str) -> dict[str, Any]:
    found = world.cluster.get("zmpool", pool)
    assert found is not None
    return dict(found.get("status") or {})


async def _delete(rt: Any, body: dict[str, Any]) -> None:
    """The controller's own deletion path: its worker sees the deleted object."""
    posting.event_queue_loop_var.set(asyncio.get_running_loop())
    worker = Worker(rt)
    worker.observe(body)
    await worker.reconcile(body["metadata"]["uid"])


def _public_node(world: World) -> Any:
    fleet = agents()
    rt = world.runtime(fleet)
    rt.inventory.nodes["node-a"].public_interface = "wan"
    return fleet, rt


def test_an_address_per_zmachine_on_a_public_node_then_none(
    world: World, pool: str, events: Any
) -> None:
    fleet, rt = _public_node(world)
    first = world.create("pub-first", network=PUBLIC)
    pinned = world.create("pub-pinned", network=PUBLIC, nodeName="node-b")
    second = world.create("pub-second", network=PUBLIC)
    try:
        asyncio.run(run_converge(rt, first))
        # node-a is the only node with a public interface.
        assert world.body("pub-first")["status"]["nodeName"] == "node-a"
        sent = fleet.by_address["node-a"].specs[first["metadata"]["uid"]].public
        assert (sent.ipv4, sent.gateway4) == ("203.0.113.10/24", "203.0.113.1")
        assert (sent.ipv6, sent.gateway6) == ("2001:db8:1::10/64", "2001:db8:1::1")
        status = _status(world, pool)
        assert status["free"] == 0
        assert status["allocations"] == [
            {
                "uid": first["metadata"]["uid"],
                "zmachine": f"{world.ns}/pub-first",
                "ipv4": "203.0.113.10/24",
                "ipv6": "2001:db8:1::10/64",
            }
        ]
        # Pinned to a node without a public interface: refused, naming the node.
        out = asyncio.run(run_converge(rt, pinned))
        assert out.patch.status["phase"] == "Pending"
        assert "node node-b (spec.nodeName) has no public interface" in out.patch.status["message"]
        # The pool is empty: the next one waits, told why (object and field named).
        out = asyncio.run(run_converge(rt, second))
        assert out.patch.status["phase"] == "Pending"
        message = out.patch.status["message"]
        assert f"zmachine {world.ns}/pub-second: spec.network.publicIP" in message, message
        assert f"no free public address left in any ZmachinePublicIPPool: {pool}" in message
        assert "nodeName" not in world.body("pub-second").get("status", {})
        # Converging the holder again keeps its address (idempotent, no second entry).
        asyncio.run(run_converge(rt, world.body("pub-first")))
        assert len(_status(world, pool)["allocations"]) == 1

        # Deleting the holder (the controller's worker) returns the address...
        world.delete("pub-first")
        body = world.body("pub-first")
        asyncio.run(_delete(rt, body))
        assert first["metadata"]["uid"] in fleet.by_address["node-a"].deletes
        assert _status(world, pool) == {"allocations": [], "free": 1}
        # ...and the waiting one gets it.
        asyncio.run(run_converge(rt, world.body("pub-second")))
        sent = fleet.by_address["node-a"].specs[second["metadata"]["uid"]].public
        assert sent.ipv4 == "203.0.113.10/24"
        assert [a["zmachine"] for a in _status(world, pool)["allocations"]] == [
            f"{world.ns}/pub-second"
        ]
    finally:
        for name in ("pub-first", "pub-pinned", "pub-second"):
            world.cleanup(name)


def test_dropping_public_ip_from_the_spec_releases_the_address(
    world: World, pool: str, events: Any
) -> None:
    fleet, rt = _public_node(world)
    body = world.create("pub-dropped", network=PUBLIC)
    try:
        asyncio.run(run_converge(rt, body))
        assert _status(world, pool)["free"] == 0
        patch = json.dumps({"spec": {"network": {"publicIP": False}}})
        world.cluster.kubectl("-n", world.ns, "patch", "zm", "pub-dropped", "--type=merge",
                              "-p", patch)  # fmt: skip
        asyncio.run(run_converge(rt, world.body("pub-dropped")))
        sent = fleet.by_address["node-a"].specs[body["metadata"]["uid"]]
        assert not sent.HasField("public")
        assert _status(world, pool) == {"allocations": [], "free": 1}
    finally:
        world.cleanup("pub-dropped")


def test_no_pool_at_all_is_said_so(world: World, events: Any) -> None:
    if json.loads(world.cluster.kubectl("get", "zmpool", "-o", "json").stdout)["items"]:
        pytest.skip("another test's pool exists in the shared API server")
    _, rt = _public_node(world)
    body = world.create("pub-nopool", network=PUBLIC)
    try:
        out = asyncio.run(run_converge(rt, body))
        assert out.patch.status["phase"] == "Pending"
        assert (
            "spec.network.publicIP: no ZmachinePublicIPPool exists" in (out.patch.status["message"])
        )
    finally:
        world.cleanup("pub-nopool")
