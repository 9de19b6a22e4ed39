"""Private networks on a node, laid out as zos lays out a network resource.

For each network with a machine on this node (``h``: 8 hex of sha256(node/network uid)):

* bridge ``zb<h>`` in the node's namespace, no address: the guests' taps join it;
* namespace ``zn-<h>``, the network's router: ``gw0`` (veth to the bridge) holds the
  subnet's .1 and the IPv6 /64's ::1, forwarding on;
* ``zw<h>``: the overlay device (wireguard.py), in ``zn-<h>``, with 100.64.<o2>.<o3>/16 as
  zos gives it; routes to each peer node's /24 and /64 go through it;
* with NAT: veth ``zu<h>`` (node) / ``up0`` (router) on a 100.127.x.y/30 link, the router's
  default route through it, masqueraded twice (router: into the link address, unique per
  network so overlapping ranges of two networks never meet; node: to its uplink), and an
  nftables table ``zm_<h>`` in the node's namespace keeping guests away from the node
  itself and from other networks' links.

With a mycelium NIC, the network's mycelium router runs in ``zn-<h>`` too (mycelium.py).

Nothing holds an address in the node's namespace but the NAT link, so the node cannot
reach guests and networks cannot reach each other. The state of each network (its config
and peers) is ``<state-dir>/networks/<h>.json``; its IPAM ``<h>.ipam.json`` lists its
machines, and the network is removed with the last one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from controller.agent.network import addressing, wireguard
from controller.agent.network.local import (
    IPAllocator,
    NetworkError,
    _check,
    _ip,
    create_tap,
    link_exists,
    netns_argv,
)
from controller.agent.network.mycelium import MyceliumRouter, peer_uris, router_key
from controller.agent.runtime.procs import ProcessRef, terminate
from controller.agent.spec import Interface

log = structlog.get_logger(__name__)

NAT_LINKS = ipaddress.IPv4Network("100.127.0.0/16")
ROUTER_PORT = "gw0"
UPLINK_PORT = "up0"


def short_id(node: str, network_id: str) -> str:
    return hashlib.sha256(f"{node}/{network_id}".encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Names:
    h: str

    @property
    def netns(self) -> str:
        return f"zn-{self.h}"

    @property
    def bridge(self) -> str:
        return f"zb{self.h}"

    @property
    def veth(self) -> str:
        return f"zv{self.h}"

    @property
    def wg(self) -> str:
        return f"zw{self.h}"

    @property
    def uplink(self) -> str:
        return f"zu{self.h}"

    @property
    def table(self) -> str:
        return f"zm_{self.h}"


@dataclass(frozen=True)
class NetworkState:
    """What the node keeps about one network (``networks/<h>.json``)."""

    interface: Interface  # as the last Deploy sent it, without a machine's ip
    nat_link: str = ""  # the /30 of the NAT link, when nat
    peers: tuple[wireguard.Peer, ...] = ()
    wg_pid: int = 0
    wg_start: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkState:
        peers = tuple(
            wireguard.Peer(p["public_key"], p["endpoint"], tuple(p["allowed_ips"]))
            for p in data["peers"]
        )
        return cls(**{**data, "interface": Interface(**data["interface"]), "peers": peers})


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    _check(result, what)


class PrivateNetworks:
    """The private networks of this node (one instance per agent)."""

    def __init__(
        self,
        node: str,
        state_dir: Path,
        node_netns: str | None,
        wireguard_go: Path | None,
        key: X25519PrivateKey,
        mycelium: Path | None = None,
    ) -> None:
        self.node = node
        self.dir = state_dir / "networks"
        self.node_netns = node_netns
        self.wireguard_go = wireguard_go
        self.key = key
        self.mycelium = mycelium
        # Deploys, deletes and peer updates of one node's networks, one at a time: a peer
        # update must not land between the steps of a set-up and be lost by it.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ naming and state

    def names(self, network_id: str) -> Names:
        return Names(short_id(self.node, network_id))

    def ipam(self, nic: Interface) -> IPAllocator:
        return IPAllocator(nic.subnet, self.dir / f"{self.names(nic.network_id).h}.ipam.json")

    def _state_path(self, n: Names) -> Path:
        return self.dir / f"{n.h}.json"

    def load(self, network_id: str) -> NetworkState | None:
        path = self._state_path(self.names(network_id))
        if not path.exists():
            return None
        return NetworkState.from_json(json.loads(path.read_text()))

    def _states(self) -> list[NetworkState]:
        """Every network this node has state for."""
        paths = sorted(self.dir.glob("*.json")) if self.dir.exists() else []
        return [
            NetworkState.from_json(json.loads(p.read_text()))
            for p in paths
            if not p.name.endswith(".ipam.json")
        ]

    def _save(self, n: Names, state: NetworkState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path(n).with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state), indent=1))
        os.replace(tmp, self._state_path(n))

    def bridge_of(self, nic: Interface) -> str:
        return self.names(nic.network_id).bridge

    def mycelium_router(self, network_id: str) -> MyceliumRouter:
        n = self.names(network_id)
        secret = router_key(self.key.private_bytes_raw(), network_id)
        return MyceliumRouter(self.mycelium, secret, self.dir, n.h, n.netns, self.node_netns)

    # ------------------------------------------------------------------ set up

    def ensure(self, nic: Interface) -> NetworkState:
        """Create whatever of the network is missing on this node (idempotent, also after a
        reboot wiped the namespaces)."""
        with self._lock:
            return self._ensure(nic)

    def _ensure(self, nic: Interface) -> NetworkState:
        binary = wireguard.require(self.wireguard_go, f"network {nic.network}")
        n = self.names(nic.network_id)
        old = self.load(nic.network_id)
        if old is not None and old.nat_link and not nic.nat:
            self._drop_nat(n)
            old = dataclasses.replace(old, nat_link="")
        state = NetworkState(
            interface=dataclasses.replace(nic, ip=""),
            nat_link=(old.nat_link if old else "") or (self._free_nat_link() if nic.nat else ""),
            peers=old.peers if old else (),
            wg_pid=old.wg_pid if old else 0,
            wg_start=old.wg_start if old else 0,
        )
        self._save(n, state)  # first, so that a failure below is cleaned up by remove()
        subnet = ipaddress.IPv4Network(nic.subnet)
        v6 = ipaddress.IPv6Network(nic.ipv6_subnet)
        ns = n.netns
        if not Path(f"/run/netns/{ns}").exists():
            _run(["ip", "netns", "add", ns], f"network {nic.network}: namespace")
            log.info("network namespace created", network=nic.network, netns=ns)
        _check(_ip(ns, "link", "set", "lo", "up"), ns)
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            _run([*netns_argv(ns), "sysctl", "-qw", key], f"{ns}: sysctl {key}")
        node = self.node_netns
        if not link_exists(n.bridge, node):
            _check(_ip(node, "link", "add", n.bridge, "type", "bridge"), n.bridge)
        _check(_ip(node, "link", "set", n.bridge, "addrgenmode", "none"), n.bridge)
        _check(_ip(node, "link", "set", n.bridge, "up"), n.bridge)
        if not link_exists(n.veth, node):
            _drop_stale(ns, ROUTER_PORT)
            veth = ["type", "veth", "peer", "name", ROUTER_PORT, "netns", ns]
            _check(_ip(node, "link", "add", n.veth, *veth), n.veth)
        _check(_ip(node, "link", "set", n.veth, "addrgenmode", "none"), n.veth)
        _check(_ip(node, "link", "set", n.veth, "master", n.bridge, "up"), n.veth)
        gw4 = f"{addressing.gateway(subnet)}/{subnet.prefixlen}"
        gw6 = f"{v6.network_address + 1}/64"
        _check(_ip(ns, "addr", "replace", gw4, "dev", ROUTER_PORT), ns)
        _check(_ip(ns, "-6", "addr", "replace", gw6, "dev", ROUTER_PORT, "nodad"), ns)
        _check(_ip(ns, "link", "set", ROUTER_PORT, "up"), ns)
        state = self._ensure_overlay(binary, n, state, subnet)
        if nic.nat:
            self._ensure_nat(n, state, subnet)
        self._save(n, state)
        return state

    def _ensure_overlay(
        self, binary: Path, n: Names, state: NetworkState, subnet: addressing.V4Net
    ) -> NetworkState:
        ref = ProcessRef(state.wg_pid, state.wg_start, n.wg) if state.wg_pid else None
        if ref is None or not ref.alive() or not link_exists(n.wg, n.netns):
            self._stop_overlay_sync(ref, n)
            self.dir.mkdir(parents=True, exist_ok=True)
            ref = wireguard.start(binary, n.wg, self.node_netns, self.dir / f"{n.h}.wg.log")
            _check(_ip(self.node_netns, "link", "set", n.wg, "netns", n.netns), n.wg)
            state = dataclasses.replace(state, wg_pid=ref.pid, wg_start=ref.start_time)
            self._save(n, state)
            log.info("overlay started", network=state.interface.network, device=n.wg, pid=ref.pid)
        wireguard.configure(n.wg, self.key, state.interface.listen_port, list(state.peers))
        o = subnet.network_address.packed
        _check(_ip(n.netns, "addr", "replace", f"100.64.{o[1]}.{o[2]}/16", "dev", n.wg), n.wg)
        _check(_ip(n.netns, "link", "set", n.wg, "mtu", str(wireguard.MTU), "up"), n.wg)
        self._routes(n, state)
        return state

    def _routes(self, n: Names, state: NetworkState) -> None:
        """Each peer's subnets through the overlay; routes of peers gone are removed."""
        want = {
            str(ipaddress.ip_network(a))
            for p in state.peers
            for a in p.allowed_ips
            if ipaddress.ip_network(a).prefixlen < (32 if ":" not in a else 128)
        }
        have = set()
        for family in ("-4", "-6"):
            out = _ip(n.netns, family, "-j", "route", "show", "dev", n.wg)
            for route in json.loads(out.stdout or "[]"):
                dst = route.get("dst", "")
                if "/" in dst and route.get("protocol") != "kernel":
                    have.add(str(ipaddress.ip_network(dst)))
        for dst in sorted(want - have):
            _check(_ip(n.netns, "route", "replace", dst, "dev", n.wg), f"{n.wg}: route {dst}")
        for dst in sorted(have - want):
            _check(_ip(n.netns, "route", "del", dst, "dev", n.wg), f"{n.wg}: route {dst}")

    def _free_nat_link(self) -> str:
        used = {state.nat_link for state in self._states()}
        for link in NAT_LINKS.subnets(new_prefix=30):
            if str(link) not in used:
                return str(link)
        raise NetworkError(f"no free NAT link left in {NAT_LINKS}")

    def _ensure_nat(self, n: Names, state: NetworkState, subnet: addressing.V4Net) -> None:
        link = ipaddress.IPv4Network(state.nat_link)
        node_end, router_end = link.network_address + 1, link.network_address + 2
        node = self.node_netns
        if not link_exists(n.uplink, node):
            _drop_stale(n.netns, UPLINK_PORT)
            veth = ["type", "veth", "peer", "name", UPLINK_PORT, "netns", n.netns]
            _check(_ip(node, "link", "add", n.uplink, *veth), n.uplink)
        _check(_ip(node, "addr", "replace", f"{node_end}/30", "dev", n.uplink), n.uplink)
        _check(_ip(node, "link", "set", n.uplink, "up"), n.uplink)
        _check(_ip(n.netns, "addr", "replace", f"{router_end}/30", "dev", UPLINK_PORT), n.netns)
        _check(_ip(n.netns, "link", "set", UPLINK_PORT, "up"), n.netns)
        _check(_ip(n.netns, "route", "replace", "default", "via", str(node_end)), n.netns)
        _run([*netns_argv(node), "sysctl", "-qw", "net.ipv4.ip_forward=1"], "node: ip_forward")
        # Router: guests leave as the link address. Node: the link leaves as the uplink,
        # never reaches the node itself nor another network's link.
        router_rules = f"""
table ip {n.table} {{
  chain post {{ type nat hook postrouting priority srcnat; oifname "{UPLINK_PORT}" ip saddr {subnet} masquerade; }}
}}
"""  # noqa: E501
        node_rules = f"""
table ip {n.table} {{
  chain post {{ type nat hook postrouting priority srcnat; ip saddr {router_end} oifname != "{n.uplink}" masquerade; }}
  chain input {{ type filter hook input priority filter; iifname "{n.uplink}" ct state established,related accept; iifname "{n.uplink}" drop; }}
  chain forward {{ type filter hook forward priority filter; iifname "{n.uplink}" oifname "zu*" drop; }}
}}
"""  # noqa: E501
        for where, rules in ((n.netns, router_rules), (node, node_rules)):
            self._nft_replace(where, n.table, rules)

    def _drop_nat(self, n: Names) -> None:
        """NAT turned off: the link (and with it the router's default route) and both
        tables go."""
        for where in (n.netns, self.node_netns):
            subprocess.run([*netns_argv(where), "nft", "delete", "table", "ip", n.table],
                           capture_output=True, check=False)  # fmt: skip
        if link_exists(n.uplink, self.node_netns):
            _check(_ip(self.node_netns, "link", "del", n.uplink), n.uplink)
            log.info("network NAT removed", netns=n.netns)

    def _nft_replace(self, netns: str | None, table: str, rules: str) -> None:
        prefix = netns_argv(netns)
        subprocess.run([*prefix, "nft", "delete", "table", "ip", table], capture_output=True,
                       check=False)  # fmt: skip
        _run([*prefix, "nft", "-f", "-"], f"nft table {table}", stdin=rules)

    def attach_mycelium(self, nic: Interface, tap: str, where: str) -> ipaddress.IPv6Network:
        """``tap`` on the network's mycelium bridge, the network and its mycelium router
        set up first; the router's /64."""
        with self._lock:
            # The private NIC set the network up just before (create_nics, ensure_taps).
            state = self.load(nic.network_id) or self._ensure(nic)
            router = self.mycelium_router(nic.network_id)
            subnet = router.ensure(_mycelium_peers(state), where)
            create_tap(tap, router.bridge, self.node_netns)
            return subnet

    # ------------------------------------------------------------------ peers

    def apply(
        self, network_id: str, peers: list[wireguard.Peer], nic: Interface | None = None
    ) -> bool:
        """Replace the overlay peers, and apply the network's options when `nic` changed
        them; False when the network is not on this node."""
        with self._lock:
            state = self.load(network_id)
            if state is None:
                return False
            if nic is not None and dataclasses.replace(nic, ip="") != state.interface:
                self._ensure(nic)
            return self._apply_peers(network_id, peers)

    def _apply_peers(self, network_id: str, peers: list[wireguard.Peer]) -> bool:
        state = self.load(network_id)
        if state is None:
            return False
        n = self.names(network_id)
        state = dataclasses.replace(state, peers=tuple(peers))
        self._save(n, state)
        if link_exists(n.wg, n.netns):
            wireguard.configure(n.wg, self.key, state.interface.listen_port, peers)
            self._routes(n, state)
        self.mycelium_router(network_id).keep(_mycelium_peers(state))
        return True

    # ------------------------------------------------------------------ tear down

    def _stop_overlay_sync(self, ref: ProcessRef | None, n: Names) -> None:
        if ref is not None:
            asyncio.run(terminate(ref))  # callers run in worker threads, with no loop
        wireguard.socket_path(n.wg).unlink(missing_ok=True)

    def remove_if_unused(self, nic: Interface) -> None:
        """Remove the network from the node once its IPAM holds no machine."""
        with self._lock:
            self._remove_if_unused(nic)

    def _remove_if_unused(self, nic: Interface) -> None:
        n = self.names(nic.network_id)
        ipam = self.dir / f"{n.h}.ipam.json"
        if ipam.exists() and json.loads(ipam.read_text() or "{}"):
            return
        self.remove(nic.network_id)

    def remove(self, network_id: str) -> None:
        n = self.names(network_id)
        state = self.load(network_id)
        ref = ProcessRef(state.wg_pid, state.wg_start, n.wg) if state and state.wg_pid else None
        self._stop_overlay_sync(ref, n)
        self.mycelium_router(network_id).remove()
        node = self.node_netns
        self._drop_nat(n)
        for link in (n.veth, n.bridge):
            if link_exists(link, node):
                _check(_ip(node, "link", "del", link), f"network {network_id}: {link}")
        if Path(f"/run/netns/{n.netns}").exists():
            _run(["ip", "netns", "del", n.netns], f"network {network_id}: namespace")
        for suffix in (".json", ".ipam.json", ".ipam.lock", ".wg.log"):
            (self.dir / f"{n.h}{suffix}").unlink(missing_ok=True)
        log.info("network removed", network_id=network_id, netns=n.netns)

    def remove_all(self) -> None:
        """Every network this node has state for (the agent's cleanup)."""
        for state in self._states():
            self.remove(state.interface.network_id)


def _mycelium_peers(state: NetworkState) -> tuple[str, ...]:
    return peer_uris([a for p in state.peers for a in p.allowed_ips])


def _drop_stale(netns: str, port: str) -> None:
    """A router end whose node end is gone (the node namespace was recreated) would block
    creating the pair again."""
    if link_exists(port, netns):
        _check(_ip(netns, "link", "del", port), f"{netns}: stale {port}")
