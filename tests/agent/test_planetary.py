"""Planetary (Yggdrasil) across two nodes, with real agents, real routers and real QEMU
guests.

Each node is an agent whose namespace (``--netns``) has an uplink on an underlay bridge
the test creates. Each agent's router dials the other one, as the controller's code
(planetary.py) computes the peers from the agents' NodeInfo. ``b1`` on node-b comes up
first; ``a1`` on node-a pings ``b1``'s planetary address. Deleting both stops both
routers and leaves no bridge, tap, TUN device or route on either node.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.network import local
from controller.agent.network.yggdrasil import BRIDGE, DEVICE, guest_address
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import planetary
from controller.operator.inventory import NodeView
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import wait_for
from tests.agent.test_private_networks import (  # noqa: F401 (net_flist: a fixture)
    console,
    console_once,
    host,
    net_flist,
    results,
)
from tests.netns import underlay

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.qemu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        shutil.which("yggdrasil") is None,
        reason="no yggdrasil binary (hack/install-system-deps.sh installs Debian's)",
    ),
]


@pytest.fixture(scope="module")
def ygg_nodes(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    net_flist: Path,  # noqa: F811
) -> Iterator[tuple[dict[str, AgentProcess], dict[str, tuple[str, str]]]]:
    with underlay(["node-a", "node-b"], public=False) as spaces:
        agents = {}
        for node in ("node-a", "node-b"):
            netns, address = spaces[node]
            state = tmp_path_factory.mktemp(f"y{node}") / "state"  # short: a state dir budget
            agents[node] = agent_process(
                state, agent_pki, netns, agent_guest_dir, net_flist.parent,
                "--node-name", node, "--underlay-address", address,
            )  # fmt: skip
            agents[node].start()
        try:
            yield agents, spaces
        finally:
            for agent in agents.values():
                try:
                    agent.delete_all()
                finally:
                    agent.stop()


def _spec(flist: Path, script: str) -> pb.ZmachineSpec:
    return pb.ZmachineSpec(
        flist=f"file://{flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint=f"/bin/sh -c '{script}; while :; do sleep 3600; done'",
        restart_policy=pb.RESTART_POLICY_ALWAYS, planetary=True,
    )  # fmt: skip


def test_two_nodes_ping_over_yggdrasil(
    ygg_nodes: tuple[dict[str, AgentProcess], dict[str, tuple[str, str]]],
    net_flist: Path,  # noqa: F811
) -> None:
    agents, spaces = ygg_nodes
    before = {n: host(spaces[n][0], "ip", "-o", "link").stdout for n in agents}
    routes = {n: host(spaces[n][0], "ip", "-6", "route").stdout for n in agents}
    views = {}
    for name, agent in agents.items():
        info = agent.call("node_info")
        assert isinstance(info, pb.NodeInfoResponse)
        assert info.planetary_peer == f"tls://{spaces[name][1]}:9943"
        views[name] = NodeView(
            name, agent.address, 1, 1, ready=True, planetary_peer=info.planetary_peer
        )
    for name, agent in agents.items():
        peers = planetary.peers_for(name, views)
        assert peers == [views[o].planetary_peer for o in agents if o != name]
        resp = agent.call("apply_planetary", peers)
        assert isinstance(resp, pb.ApplyPlanetaryResponse) and not resp.running  # no NIC yet

    ref_b = pb.ZmachineRef(namespace="default", name="b1", uid="uid-yb1")
    agents["node-b"].call("deploy", ref_b, 1, _spec(net_flist, "true"))

    def nics(agent: AgentProcess, uid: str) -> list[pb.InterfaceStatus] | None:
        machine = agent.call("get", uid)
        assert isinstance(machine, pb.Machine)
        return list(machine.interfaces) or None

    (nic,) = wait_for("b1's NIC", lambda: nics(agents["node-b"], "uid-yb1"), timeout=120)
    tap = local.tap_name("uid-yb1", 0, "y")
    assert (nic.network, nic.tap, nic.mac) == ("ygg", tap, local.zos_mac(f"ygg:{tap}"))
    address = ipaddress.IPv6Address(nic.ipv6)
    subnet = ipaddress.IPv6Network(f"{address}/64", strict=False)
    assert address in ipaddress.IPv6Network("300::/8")
    assert address == guest_address(subnet, nic.mac)

    ref_a = pb.ZmachineRef(namespace="default", name="a1", uid="uid-ya1")
    script = f"nettest ygg 150 ping6 -c1 -W2 {address}"
    try:
        agents["node-a"].call("deploy", ref_a, 1, _spec(net_flist, script))
        text = wait_for(
            "a1 to ping b1 over yggdrasil",
            lambda: console_once(agents["node-a"], "uid-ya1", lambda t: bool(results(t, "ygg"))),
            timeout=300,
        )
        assert results(text, "ygg")[-1] == "OK"
        (a1,) = nics(agents["node-a"], "uid-ya1") or []
        other = ipaddress.IPv6Network(f"{a1.ipv6}/64", strict=False)
        assert other != subnet  # each node routes its own /64
        # A router running with a NIC says so. New peers restart it: routing through it
        # still works afterwards (node-a's namespace reaches b1 over Yggdrasil).
        ping = ("busybox", "ping6", "-c1", "-W2", str(address))
        node_a = spaces["node-a"][0]
        peers = [*planetary.peers_for("node-a", views), "tls://192.0.2.99:9943"]
        resp = agents["node-a"].call("apply_planetary", peers)
        assert isinstance(resp, pb.ApplyPlanetaryResponse) and resp.running
        config = agents["node-a"].state_dir / "yggdrasil/router.json"
        assert "tls://192.0.2.99:9943" in json.loads(config.read_text())["Peers"]
        wait_for(
            "node-a to reach b1 after the restart", lambda: host(node_a, *ping).returncode == 0
        )
    except AssertionError:
        for name, uid in (("node-a", "uid-ya1"), ("node-b", "uid-yb1")):
            print(f"--- {uid}:\n{console(agents[name], uid)[-1500:]}")
            print(agents[name].log_text())
            for log in agents[name].state_dir.glob("yggdrasil/router.*"):
                print(log, log.read_text(errors="replace")[-1500:])
        raise

    assert agents["node-a"].call("delete", "uid-ya1") is True
    assert agents["node-b"].call("delete", "uid-yb1") is True
    for name, agent in agents.items():
        netns = spaces[name][0]
        links = host(netns, "ip", "-o", "link").stdout
        assert links == before[name]
        assert BRIDGE not in links and DEVICE not in links
        assert host(netns, "ip", "-6", "route").stdout == routes[name]
        marker = str(agent.state_dir / "yggdrasil")
        pgrep = subprocess.run(["pgrep", "-f", marker], capture_output=True)
        assert pgrep.stdout == b"", f"the router of {name} still runs"
