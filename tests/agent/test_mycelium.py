"""Mycelium NICs, with real agents and real QEMU guests.

* The address: the router's /64, ff0f, then the seed; seeds zos refuses are refused.
* The plumbing, on every machine: one node whose agent runs a stand-in router
  (standin_mycelium.py: no registry carries mycelium, so CI has none), and the real one
  where it is found. The guest gets its address and its route to 400::/7 and reaches its
  gateway; the same seed gets the same address after the network left the node and came
  back; deleting leaves nothing.
* Two nodes with the real daemon, where a mycelium binary is found ($ZM_MYCELIUM, or on
  PATH): guests on the two nodes ping each other's mycelium addresses.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controller.agent.network import local, mycelium
from controller.agent.network.private import short_id
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import networks
from hack.controlplane import wireguard_go_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import wait_for
from tests.agent.test_private_networks import (
    PREFIX,
    console,
    console_once,
    guest_spec,
    host,
    interface,
    nettest_flist,
    network,
    results,
    tell_peers,
)
from tests.netns import underlay

STANDIN = Path(__file__).with_name("standin_mycelium.py")
SEED = "a1b2c3d4e5f6"
# Pings the gateway of the guest's route to 400::/7.
MYCGW = """#!/bin/sh
gw=$(ip -6 route show 400::/7 | sed -n 's/.* via \\([^ ]*\\).*/\\1/p')
exec ping6 -c1 -W1 "$gw"
"""


def test_the_address_is_the_routers_64_ff0f_and_the_seed() -> None:
    subnet = ipaddress.IPv6Network("4a1:2b3c:4d5e:6f70::/64")
    address = mycelium.guest_address(subnet, bytes.fromhex(SEED))
    assert address == ipaddress.IPv6Address("4a1:2b3c:4d5e:6f70:ff0f:a1b2:c3d4:e5f6")
    assert mycelium.guest_address(subnet, bytes.fromhex(SEED)) == address  # same seed
    assert mycelium.gateway(subnet) == ipaddress.IPv6Address("4a1:2b3c:4d5e:6f70::1")
    for bad in ("000000000000", "ffffffffffff", "a1b2c3"):
        with pytest.raises(ValueError):
            mycelium.guest_address(subnet, bytes.fromhex(bad))
    with pytest.raises(ValueError, match="/64"):
        mycelium.guest_address(ipaddress.IPv6Network("4a1:2b3c::/48"), bytes.fromhex(SEED))


def test_routers_peer_at_their_overlay_addresses_only() -> None:
    allowed = ["10.20.2.0/24", "fd12::/64", "100.64.20.2/32", "100.64.20.3/32", "10.9.9.9/32"]
    assert mycelium.peer_uris(allowed) == ("tcp://100.64.20.2:9651", "tcp://100.64.20.3:9651")


def test_router_keys_are_per_network_and_stable() -> None:
    key = os.urandom(32)
    assert mycelium.router_key(key, "net-1") == mycelium.router_key(key, "net-1")
    assert mycelium.router_key(key, "net-1") != mycelium.router_key(key, "net-2")
    assert mycelium.router_key(key, "net-1") != mycelium.router_key(os.urandom(32), "net-1")


NO_MYCELIUM = "no mycelium binary (set ZM_MYCELIUM or put mycelium on PATH; no registry has it)"


def real_mycelium() -> Path | None:
    found = os.environ.get("ZM_MYCELIUM") or shutil.which("mycelium")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def myc_flist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("myc-flist")
    return nettest_flist(base, ("ip", "sed"), mycgw=MYCGW)


@pytest.fixture(scope="module", params=["stand-in", "mycelium"])
def router_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in router everywhere; the real one too where it is found."""
    if request.param == "mycelium":
        real = real_mycelium()
        if real is None:
            pytest.skip(NO_MYCELIUM)
        return real
    wrapper = tmp_path_factory.mktemp("standin-myc") / "mycelium"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@contextmanager
def _nodes(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Path,
    guest_dir: Path,
    flist: Path,
    binary: Path,
    names: list[str],
) -> Iterator[tuple[dict[str, AgentProcess], dict[str, tuple[str, str]]]]:
    with underlay(names) as spaces:
        agents = {}
        for node in names:
            netns, address = spaces[node]
            agents[node] = agent_process(
                tmp_path_factory.mktemp("myc") / "state", pki, netns, guest_dir, flist.parent,
                "--node-name", node, "--wireguard-go", str(wireguard_go_path()),
                "--underlay-address", address, "--mycelium", str(binary),
            )  # fmt: skip
            agents[node].start()
        try:
            yield agents, spaces
        finally:
            try:
                for agent in agents.values():
                    agent.delete_all()
            finally:
                for agent in agents.values():
                    agent.stop()


def _deploy(
    agent: AgentProcess, name: str, nic: pb.NetworkInterface, flist: Path, script: str
) -> pb.InterfaceStatus:
    """Deploy with a mycelium NIC (seed SEED); its status once provisioned."""
    spec = guest_spec(flist, nic, script)
    spec.mycelium_seed = SEED
    agent.call("deploy", pb.ZmachineRef(namespace="default", name=name, uid=f"uid-{name}"), 1, spec)

    def nic_status() -> pb.InterfaceStatus | None:
        machine = agent.call("get", f"uid-{name}")
        assert isinstance(machine, pb.Machine)
        assert machine.state != pb.MACHINE_STATE_FAILED, machine.message
        return machine.interfaces[-1] if len(machine.interfaces) == 2 else None

    status: pb.InterfaceStatus = wait_for(f"{name}'s NICs", nic_status, timeout=120)
    return status


def _router_processes(key_file: Path) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(key_file).encode() in cmdline:
            out.append(int(pid))
    return out


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_a_guest_gets_its_mycelium_address_and_gateway_and_nothing_is_left(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    myc_flist: Path,
    router_binary: Path,
) -> None:
    with _nodes(
        tmp_path_factory, agent_pki, agent_guest_dir, myc_flist, router_binary, ["node-a"]
    ) as (
        agents,
        spaces,
    ):
        _single_node(agents["node-a"], spaces["node-a"][0], myc_flist)


def _single_node(agent: AgentProcess, node_ns: str, myc_flist: Path) -> None:
    try:
        info = agent.call("node_info")
        assert isinstance(info, pb.NodeInfoResponse) and info.mycelium
        net = network(f"office-{uuid.uuid4().hex[:8]}", "office", PREFIX, False, ["node-a"], 51820)
        h = short_id("node-a", net.uid)
        links_before = host(node_ns, "ip", "-o", "link").stdout
        nic = _deploy(agent, "m1", interface(net, "node-a", "10.20.1.5"), myc_flist,
                      "nettest gw 90 mycgw")  # fmt: skip
        tap = local.tap_name("uid-m1", 0, "m")
        assert (nic.network, nic.tap, nic.mac) == (
            "mycelium",
            tap,
            local.zos_mac(f"mycelium:{tap}"),
        )
        address = ipaddress.IPv6Address(nic.ipv6)
        subnet = ipaddress.IPv6Network(f"{address}/64", strict=False)
        assert address == mycelium.guest_address(subnet, bytes.fromhex(SEED))
        router = f"zn-{h}"
        assert f"{mycelium.gateway(subnet)}/64" in host(router, "ip", "-6", "-o", "addr").stdout
        key_file = agent.state_dir / "networks" / f"{h}.mycelium.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert _router_processes(key_file), "no mycelium router runs for the network"

        text = wait_for(
            "the guest to ping its mycelium gateway",
            lambda: console_once(agent, "uid-m1", lambda t: bool(results(t, "gw"))),
            timeout=240,
        )
        assert results(text, "gw") == ["OK"], text

        # A router that dies is started again with the next peer update.
        (pid,) = _router_processes(key_file)
        os.kill(pid, signal.SIGKILL)
        wait_for("the router to die", lambda: pid not in _router_processes(key_file))
        nic_spec = networks.agent_interface(net, "node-a", None)
        applied = agent.call("apply_network", net.uid, [], nic_spec)
        assert isinstance(applied, pb.ApplyNetworkResponse) and applied.present
        (restarted,) = _router_processes(key_file)
        assert restarted != pid and f"{mycelium.DEVICE}:" in host(router, "ip", "-o", "link").stdout

        assert agent.call("delete", "uid-m1") is True
        # The network left the node with its last machine, router and all.
        assert host(node_ns, "ip", "-o", "link").stdout == links_before
        assert not Path(f"/run/netns/{router}").exists()
        assert not list((agent.state_dir / "networks").glob(f"{h}.*"))
        assert _router_processes(key_file) == []

        # Back on the node: the same seed, the same address.
        again = _deploy(agent, "m2", interface(net, "node-a", "10.20.1.6"), myc_flist, "true")
        assert again.ipv6 == str(address)
        assert agent.call("delete", "uid-m2") is True
        assert host(node_ns, "ip", "-o", "link").stdout == links_before
        assert _router_processes(key_file) == []
    except AssertionError:
        print(console(agent, "uid-m1")[-2000:], agent.log_text())
        raise


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(900)
@pytest.mark.skipif(real_mycelium() is None, reason=NO_MYCELIUM)
def test_guests_on_two_nodes_ping_each_other_over_mycelium(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    myc_flist: Path,
) -> None:
    binary = real_mycelium()
    assert binary is not None
    names = ["node-a", "node-b"]
    with _nodes(tmp_path_factory, agent_pki, agent_guest_dir, myc_flist, binary, names) as (
        agents,
        _,
    ):
        _two_nodes(agents, names, myc_flist)


def _two_nodes(agents: dict[str, AgentProcess], names: list[str], myc_flist: Path) -> None:
    net = network(f"office-{uuid.uuid4().hex[:8]}", "office", PREFIX, False, names, 51820)
    try:
        b1 = _deploy(agents["node-b"], "b1", interface(net, "node-b", "10.20.2.5"), myc_flist,
                     "true")  # fmt: skip
        a1 = _deploy(agents["node-a"], "a1", interface(net, "node-a", "10.20.1.5"), myc_flist,
                     f"nettest myc 150 ping6 -c1 -W2 {b1.ipv6}")  # fmt: skip
        assert ipaddress.IPv6Network(f"{a1.ipv6}/64", strict=False) != ipaddress.IPv6Network(
            f"{b1.ipv6}/64", strict=False
        )  # each node's router has its own /64
        tell_peers(agents, [net])
        text = wait_for(
            "a1 to ping b1 over mycelium",
            lambda: console_once(agents["node-a"], "uid-a1", lambda t: bool(results(t, "myc"))),
            timeout=360,
        )
        assert results(text, "myc") == ["OK"], text
    except AssertionError:
        for node, uid in (("node-a", "uid-a1"), ("node-b", "uid-b1")):
            print(console(agents[node], uid)[-1500:], agents[node].log_text())
            h = short_id(node, net.uid)
            print(host(f"zn-{h}", "ip", "-6", "route").stdout)
            router_log = agents[node].state_dir / "networks" / f"{h}.mycelium.log"
            print(router_log.read_text()[-3000:] if router_log.exists() else "no router log")
        raise
