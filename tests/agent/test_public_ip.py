"""A public NIC with a real agent and a real QEMU guest.

The node is an agent in its own namespace (``--netns``) whose public interface ``wan``
is one end of a veth; the other end sits in the test's "internet" namespace, which holds
the public gateway (203.0.113.1, 2001:db8:1::1) and, beyond it, a test host
(198.51.100.1, 2001:db8:ff::1 on its loopback). The guest must be reachable from there at
its public addresses, reach the host beyond the gateway (its default routes go through
the public NIC, as in zos), and after deletion the node must keep nothing of it: no
bridge, tap, route or nftables rule, and ``wan`` released from the bridge.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.network import local
from controller.agent.network.public import BRIDGE
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import wait_for
from tests.agent.test_private_networks import (  # noqa: F401 (net_flist: a fixture)
    PING,
    console,
    console_once,
    host,
    net_flist,
    results,
)
from tests.netns import underlay

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(600)]

GUEST4, GUEST6 = "203.0.113.10", "2001:db8:1::10"
BEYOND4, BEYOND6 = "198.51.100.1", "2001:db8:ff::1"
PING6 = ("busybox", "ping6", "-c1", "-W1")


@pytest.fixture(scope="module")
def public_node(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    net_flist: Path,  # noqa: F811
) -> Iterator[tuple[AgentProcess, str, str]]:
    with underlay(["node-a"]) as spaces:
        node, internet = spaces["node-a"][0], spaces["public"][0]
        for argv in (
            ["-n", node, "link", "add", "wan", "type", "veth", "peer", "name", "inet0",
             "netns", internet],
            ["-n", node, "link", "set", "wan", "up"],
            ["-n", internet, "addr", "add", "203.0.113.1/24", "dev", "inet0"],
            ["-n", internet, "addr", "add", "2001:db8:1::1/64", "dev", "inet0", "nodad"],
            ["-n", internet, "addr", "add", f"{BEYOND4}/32", "dev", "lo"],
            ["-n", internet, "addr", "add", f"{BEYOND6}/128", "dev", "lo"],
            ["-n", internet, "link", "set", "inet0", "up"],
        ):  # fmt: skip
            subprocess.run(["ip", *argv], check=True)
        state = tmp_path_factory.mktemp("pub") / "state"  # short: a state dir budget
        agent = agent_process(
            state, agent_pki, node, agent_guest_dir, net_flist.parent,
            "--node-name", "node-a", "--public-interface", "wan",
        )  # fmt: skip
        agent.start()
        try:
            yield agent, node, internet
        finally:
            try:
                agent.delete_all()
            finally:
                agent.stop()


def _links(netns: str) -> dict[str, str]:
    """name -> master ("" for none) of every link in the namespace."""
    out = host(netns, "ip", "-o", "link", "show").stdout
    links = {}
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        links[name] = line.split(" master ")[1].split()[0] if " master " in line else ""
    return links


def test_public_guest_is_reachable_and_leaves_nothing(
    public_node: tuple[AgentProcess, str, str],
    net_flist: Path,  # noqa: F811
) -> None:
    agent, node, internet = public_node
    info = agent.call("node_info")
    assert isinstance(info, pb.NodeInfoResponse) and info.public_interface == "wan"
    links_before = _links(node)
    routes_before = host(node, "ip", "route", "show").stdout

    script = (
        f"nettest beyond4 90 ping -c1 -W1 {BEYOND4}; nettest beyond6 60 ping6 -c1 -W1 {BEYOND6}"
    )
    spec = pb.ZmachineSpec(
        flist=f"file://{net_flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint=f"/bin/sh -c '{script}; while :; do sleep 3600; done'",
        restart_policy=pb.RESTART_POLICY_ALWAYS,
        public=pb.PublicInterface(
            ipv4=f"{GUEST4}/24", gateway4="203.0.113.1",
            ipv6=f"{GUEST6}/64", gateway6="2001:db8:1::1",
        ),
    )  # fmt: skip
    ref = pb.ZmachineRef(namespace="default", name="pub1", uid="uid-pub1")
    try:
        agent.call("deploy", ref, 1, spec)
        text = wait_for(
            "the guest to reach the hosts beyond its public gateways",
            lambda: console_once(agent, "uid-pub1", lambda t: bool(results(t, "beyond6"))),
            timeout=240,
        )
        assert results(text, "beyond4")[-1] == "OK", text
        assert results(text, "beyond6")[-1] == "OK", text
        # From the "internet": the guest answers at its public addresses.
        wait_for("a ping from the internet", lambda: host(internet, *PING, GUEST4).returncode == 0)
        wait_for(
            "a ping6 from the internet", lambda: host(internet, *PING6, GUEST6).returncode == 0
        )
        machine = agent.call("get", "uid-pub1")
        assert isinstance(machine, pb.Machine)
        (nic,) = machine.interfaces
        tap = local.tap_name("uid-pub1", 0, "p")
        assert (nic.network, nic.ip, nic.ipv6, nic.tap) == ("pub", GUEST4, GUEST6, tap)
        assert nic.mac == local.zos_mac(tap)
        links = _links(node)
        assert links["wan"] == BRIDGE and links[tap] == BRIDGE
        # The node itself has no address on the public segment.
        assert host(node, "ip", "-o", "addr", "show", "dev", BRIDGE).stdout.strip() == ""
    except AssertionError:
        print(console(agent, "uid-pub1")[-2000:], agent.log_text())
        raise

    assert agent.call("delete", "uid-pub1") is True
    assert _links(node) == links_before  # no bridge, no tap; wan released from the bridge
    assert host(node, "ip", "route", "show").stdout == routes_before
    assert host(node, "nft", "list", "ruleset").stdout.strip() == ""
    assert host(internet, *PING, GUEST4).returncode == 1
