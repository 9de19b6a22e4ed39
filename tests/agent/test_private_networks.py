"""Private networks across two nodes, with real agents and real QEMU guests.

Each node is an agent whose node namespace (``--netns``) has an uplink on an underlay
bridge the test creates; a "public" host sits on that underlay too. Three guests:

* ``a1`` on node-a and ``b1`` on node-b, on network "office" (NAT on): they ping each
  other over IPv4 and IPv6, and ``a1`` pings the public host;
* ``x1`` on node-a, on network "other" (same range, NAT off): it never reaches ``b1``
  nor the public host.

The peers each agent is told are computed by the controller's own code (networks.py)
from the agents' NodeInfo, as the controller does from their ZmachineNodes. Everything
is deleted at the end, and nothing of the networks may remain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.agent.network import addressing
from controller.agent.network.local import netns_argv
from controller.agent.network.private import short_id
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.flist.pack import pack
from controller.operator import networks
from controller.operator.inventory import NodeView
from hack.controlplane import wireguard_go_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import GUEST_APPLETS, agent_process, guest_busybox_root
from tests.agent.test_agent_vm import wait_for
from tests.netns import underlay

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(600)]

RANGE = ipaddress.IPv4Network("10.20.0.0/16")
PREFIX = ipaddress.IPv6Network("fd12:3456:789a::/48")
OTHER_PREFIX = ipaddress.IPv6Network("fd12:3456:789b::/48")
SUBNETS = {
    "node-a": ipaddress.IPv4Network("10.20.1.0/24"),
    "node-b": ipaddress.IPv4Network("10.20.2.0/24"),
}
PORT = 51820
IPS = {"a1": "10.20.1.5", "b1": "10.20.2.5", "x1": "10.20.1.6"}
PUBLIC = "192.0.2.100"
PING = ("busybox", "ping", "-c1", "-W1")  # on the host, from the namespaces the test made

# Prints "ZMNET <tag> OK|FAIL" for each try of a command, at most <tries> times, stopping
# at the first OK unless <tag> starts with "watch" (then it keeps trying).
# A check prints one verdict: OK at its first success, FAIL once every try failed (a
# first failure is often the guest's address still tentative). A watch-* check prints
# every try's result.
NETTEST = """#!/bin/sh
tag=$1; tries=$2; shift 2
i=0
while [ $i -lt $tries ]; do
  if "$@" >/dev/null 2>&1; then
    echo "ZMNET $tag OK"
    case $tag in watch*) ;; *) exit 0 ;; esac
  else
    case $tag in watch*) echo "ZMNET $tag FAIL" ;; esac
  fi
  i=$((i+1)); sleep 1
done
case $tag in watch*) ;; *) echo "ZMNET $tag FAIL" ;; esac
"""


def nettest_flist(base: Path, applets: tuple[str, ...] = (), **scripts: str) -> Path:
    """A busybox root with ping6 and ``nettest`` (and more applets and scripts), packed."""
    root = guest_busybox_root(base / "rootfs")
    for applet in ("ping6", "[", "test", *applets):
        if applet not in GUEST_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
    for name, text in {"nettest": NETTEST, **scripts}.items():
        script = root / "bin" / name
        script.write_text(text)
        script.chmod(0o755)
    flist = base / "net.fl"
    pack(root, flist, [f"dir://{base / 'store'}"])
    return flist


@pytest.fixture(scope="module")
def net_flist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nettest_flist(tmp_path_factory.mktemp("net-flist"))


@pytest.fixture(scope="module")
def fabric() -> Iterator[dict[str, tuple[str, str]]]:
    with underlay(["node-a", "node-b"]) as spaces:
        yield spaces


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    net_flist: Path,
    fabric: dict[str, tuple[str, str]],
) -> Iterator[dict[str, AgentProcess]]:
    wg = wireguard_go_path()
    agents = {}
    for node in ("node-a", "node-b"):
        netns, address = fabric[node]
        state = tmp_path_factory.mktemp(node) / "state"
        agents[node] = agent_process(
            state, agent_pki, netns, agent_guest_dir, net_flist.parent,
            "--node-name", node, "--wireguard-go", str(wg), "--underlay-address", address,
        )  # fmt: skip
    for agent in agents.values():
        agent.start()
    try:
        yield agents
    finally:
        errors = []
        for agent in agents.values():
            try:
                agent.delete_all()
            except Exception as exc:  # the other node is cleaned all the same
                errors.append(exc)
            finally:
                agent.stop()
        if errors:
            raise errors[0]


def interface(network: networks.Network, node: str, ip: str) -> pb.NetworkInterface:
    return networks.agent_interface(network, node, ip)


def network(
    uid: str, name: str, prefix: ipaddress.IPv6Network, nat: bool, on: list[str], port: int
) -> networks.Network:
    return networks.Network(
        namespace="default", name=name, uid=uid, resource_version="1", ip_range=RANGE,
        ipv6_prefix=prefix, nat=nat, subnets={n: SUBNETS[n] for n in on},
        ports={n: port for n in on},
    )  # fmt: skip


def views(nodes: dict[str, AgentProcess]) -> dict[str, NodeView]:
    out = {}
    for name, agent in nodes.items():
        info = agent.call("node_info")
        assert isinstance(info, pb.NodeInfoResponse)
        out[name] = NodeView(
            name, agent.address, 1, 1, ready=True,
            wireguard_key=info.wireguard_public_key, underlay=info.underlay_address,
        )  # fmt: skip
    return out


def tell_peers(nodes: dict[str, AgentProcess], nets: list[networks.Network]) -> dict[str, NodeView]:
    """The controller's part: each node learns the others as its overlay peers, again until
    the node has the network (its provisioning runs in the background)."""
    known = views(nodes)
    assert all(v.wireguard_key and v.underlay for v in known.values())

    def told() -> bool:
        answers = []
        for net in nets:
            for node in net.subnets:
                peers = networks.peers_of(net, node, known)
                nic = networks.agent_interface(net, node, None)
                resp = nodes[node].call("apply_network", net.uid, peers, nic)
                assert isinstance(resp, pb.ApplyNetworkResponse)
                answers.append(resp.present)
        return all(answers)

    wait_for("every node to have its networks", told, timeout=120)
    return known


def console(agent: AgentProcess, uid: str) -> str:
    machine = agent.call("get", uid)
    assert isinstance(machine, pb.Machine)
    path = Path(machine.console_log)
    return path.read_text(errors="replace") if path.exists() else ""


def console_once(agent: AgentProcess, uid: str, done: Callable[[str], bool]) -> str | None:
    """The guest's console once `done` holds for it, else None."""
    text = console(agent, uid)
    return text if done(text) else None


def results(text: str, tag: str) -> list[str]:
    return re.findall(rf"ZMNET {tag} (OK|FAIL)", text)


def guest_spec(flist: Path, nic: pb.NetworkInterface, script: str) -> pb.ZmachineSpec:
    return pb.ZmachineSpec(
        flist=f"file://{flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint=f"/bin/sh -c '{script}; while :; do sleep 3600; done'",
        interfaces=[nic], restart_policy=pb.RESTART_POLICY_ALWAYS,
    )  # fmt: skip


def host(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """In the namespace's network only: `ip netns exec` would copy the mount table and
    pin the guests' mounts until it exits."""
    return subprocess.run([*netns_argv(netns), *argv], capture_output=True, text=True, check=False)


def test_two_nodes_one_network(
    nodes: dict[str, AgentProcess], net_flist: Path, fabric: dict[str, tuple[str, str]],
    tmp_path: Path,
) -> None:  # fmt: skip
    started = time.monotonic()
    # Fresh uids: the namespaces they name are the host's, and must not meet a leftover.
    run = uuid.uuid4().hex[:8]
    office = network(f"office-{run}", "office", PREFIX, True, ["node-a", "node-b"], PORT)
    other = network(f"other-{run}", "other", OTHER_PREFIX, False, ["node-a"], PORT + 1)
    v6 = {k: str(addressing.ipv6_of(PREFIX, ipaddress.IPv4Address(ip))) for k, ip in IPS.items()}
    capture = tmp_path / "underlay.pcap"
    tcpdump = subprocess.Popen(
        [*netns_argv(fabric["underlay"][0]), "tcpdump", "-i", "ul0", "-U", "-w", str(capture)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    guests = {
        "a1": ("node-a", office,
               f"nettest ping4 120 ping -c1 -W1 {IPS['b1']}; "
               f"nettest ping6 60 ping6 -c1 -W1 {v6['b1']}; "
               f"nettest public 30 ping -c1 -W1 {PUBLIC}"),
        "b1": ("node-b", office, f"nettest ping4 120 ping -c1 -W1 {IPS['a1']}"),
        "x1": ("node-a", other,
               f"nettest watch-b1 1000 ping -c1 -W1 {IPS['b1']} & "
               f"nettest watch-public 1000 ping -c1 -W1 {PUBLIC}"),
    }  # fmt: skip
    try:
        for name, (node, net, script) in guests.items():
            ref = pb.ZmachineRef(namespace="default", name=name, uid=f"uid-{name}")
            nic = interface(net, node, IPS[name])
            resp = nodes[node].call("deploy", ref, 1, guest_spec(net_flist, nic, script))
            assert isinstance(resp, pb.DeployResponse)
        known = tell_peers(nodes, [office, other])

        a1 = wait_for(
            "a1 to ping b1, b1's IPv6 and the public host",
            lambda: console_once(nodes["node-a"], "uid-a1", lambda t: bool(results(t, "public"))),
            timeout=240,
        )
        assert results(a1, "ping4")[-1] == "OK" and results(a1, "ping6")[-1] == "OK", a1
        assert results(a1, "public")[-1] == "OK", a1
        wait_for(
            "b1 to ping a1", lambda: "OK" in results(console(nodes["node-b"], "uid-b1"), "ping4")
        )
        machine = nodes["node-a"].call("get", "uid-a1")
        assert isinstance(machine, pb.Machine)
        assert (machine.interfaces[0].ip, machine.interfaces[0].ipv6) == (IPS["a1"], v6["a1"])

        # x1 keeps trying while the others talk: never once through.
        x1 = wait_for(
            "x1 to try 8 times",
            lambda: console_once(nodes["node-a"], "uid-x1", lambda t: (
                len(results(t, "watch-b1")) >= 8 and len(results(t, "watch-public")) >= 8
            )),
        )  # fmt: skip
        assert set(results(x1, "watch-b1")) == {"FAIL"}, x1
        assert set(results(x1, "watch-public")) == {"FAIL"}, x1
        # Nor does the node itself, or the public host, reach a guest.
        for where in (fabric["node-a"][0], fabric["public"][0]):
            assert host(where, *PING, IPS["a1"]).returncode == 1  # no answer (not: no ping)

        # NAT turned off on a running network: its link, default route and rules go.
        router = f"zn-{short_id('node-a', office.uid)}"
        assert "default" in host(router, "ip", "route").stdout
        off = dataclasses.replace(office, nat=False)
        peers = networks.peers_of(off, "node-a", known)
        nodes["node-a"].call(
            "apply_network", off.uid, peers, networks.agent_interface(off, "node-a", None)
        )
        assert "default" not in host(router, "ip", "route").stdout
        assert (
            f"zu{short_id('node-a', office.uid)}"
            not in host(fabric["node-a"][0], "ip", "-o", "link").stdout
        )
        assert host(router, "nft", "list", "ruleset").stdout.strip() == ""
        assert host(fabric["node-a"][0], *PING, PUBLIC).returncode == 0
    except AssertionError:
        for name, (node, net, _) in guests.items():
            print(f"--- {name} console:\n{console(nodes[node], f'uid-{name}')[-1500:]}")
            zn = f"zn-{short_id(node, net.uid)}"
            print(host(zn, "ip", "route").stdout, host(zn, "ip", "-br", "addr").stdout)
        for agent in nodes.values():
            print(agent.log_text())
        raise
    finally:
        tcpdump.terminate()
        tcpdump.wait(10)
        print(f"two-node network test: {time.monotonic() - started:.0f}s until the checks")

    # On the underlay: WireGuard's UDP, and no guest address in any byte of it.
    raw = capture.read_bytes()
    for ip in (IPS["a1"], IPS["b1"]):
        assert ipaddress.IPv4Address(ip).packed not in raw, f"{ip} readable on the underlay"
    for ip in (v6["a1"], v6["b1"]):
        assert ipaddress.IPv6Address(ip).packed not in raw, f"{ip} readable on the underlay"
    udp = subprocess.run(
        ["tcpdump", "-r", str(capture), "-n", f"udp port {PORT}"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(udp) > 10, "no overlay traffic captured"

    # Deleting every machine removes the networks from both nodes.
    for name, (node, _, _) in guests.items():
        assert nodes[node].call("delete", f"uid-{name}") is True
    for node, agent in nodes.items():
        netns = fabric[node][0]
        links = host(netns, "ip", "-o", "link", "show").stdout
        assert [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()] == [
            "lo",
            "uplink",
        ]
        routes = host(netns, "ip", "route", "show").stdout.strip().splitlines()
        assert routes == ["192.0.2.0/24 dev uplink proto kernel scope link src " + fabric[node][1]]
        assert host(netns, "nft", "list", "ruleset").stdout.strip() == ""
        assert not list((agent.state_dir / "networks").glob("*.json"))
    netns_left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for h in (short_id(n, net.uid) for n in nodes for net in (office, other)):
        assert f"zn-{h}" not in netns_left, netns_left
        assert not Path(f"/var/run/wireguard/zw{h}.sock").exists()
        pgrep = subprocess.run(["pgrep", "-f", f"wireguard-go -f zw{h}"], capture_output=True)
        assert pgrep.stdout == b"", f"wireguard-go of zw{h} still runs"
