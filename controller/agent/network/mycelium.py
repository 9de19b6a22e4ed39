"""Mycelium NICs: one mycelium router per private network and node, as zos runs one per network
resource.

The router (the ``mycelium`` daemon) runs in the network's router namespace ``zn-<h>`` with
its TUN ``myc0`` (400::/7) and a key derived from the node's secret overlay key and the
network (written to ``networks/<h>.mycelium.key``, 0600, while the network is on the node):
the network has the same mycelium /64 on this node across restarts and after being removed
and placed again. The /64 is what ``mycelium inspect`` derives from the key. The router
peers with the routers of the network's other nodes over the network's own overlay
(``tcp://100.64.x.y:9651``; discovery and QUIC off): between our nodes its traffic is
encrypted by the overlay too, and the node opens no port for it. The bridge ``zy<h>`` (node
namespace) holds the guests' mycelium taps and the node end of the veth ``zx<h>``; the
router end ``my0`` holds the /64's ::1, the guests' gateway. A guest's address is the /64,
then ``ff0f``, then its 6-byte seed: the same seed gives the same address, never the
gateway's (::1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.agent.errors import FailedPrecondition
from controller.agent.network.local import (
    _check,
    _ip,
    link_exists,
    netns_argv,
    wait_for_link,
)
from controller.agent.runtime.procs import ProcessRef, spawn_detached, terminate

log = structlog.get_logger(__name__)

DEVICE = "myc0"
ROUTER_PORT = "my0"
PEER_PORT = 9651
ROUTED = ipaddress.IPv6Network("400::/7")
SEED_BYTES = 6
# Seeds zos refuses: all zeros and all ones.
_REFUSED_SEEDS = (bytes(SEED_BYTES), b"\xff" * SEED_BYTES)
_OVERLAY = ipaddress.IPv4Network("100.64.0.0/16")


def check_seed(seed: bytes) -> None:
    """ValueError unless ``seed`` is one zos accepts."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mycelium seed is {SEED_BYTES} bytes, not {len(seed)}")
    if seed in _REFUSED_SEEDS:
        raise ValueError("a mycelium seed of all zeros or all ones is refused")


def guest_address(subnet: ipaddress.IPv6Network, seed: bytes) -> ipaddress.IPv6Address:
    """The /64's first 8 bytes, ``ff0f``, then the seed."""
    check_seed(seed)
    if subnet.prefixlen != 64:
        raise ValueError(f"a mycelium subnet is a /64, not {subnet}")
    return ipaddress.IPv6Address(subnet.network_address.packed[:8] + b"\xff\x0f" + seed)


def gateway(subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    return subnet.network_address + 1


def router_key(node_key: bytes, network_id: str) -> bytes:
    """A network's router key on a node: secret as the node's key, stable for the pair."""
    return hashlib.sha256(b"zmachine mycelium router\0" + node_key + network_id.encode()).digest()


def peer_uris(allowed_ips: list[str]) -> tuple[str, ...]:
    """The mycelium routers of a network's other nodes, at their overlay addresses (the
    100.64.x.y/32 among their peers' allowed IPs)."""
    uris = set()
    for a in allowed_ips:
        net = ipaddress.ip_network(a)
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen == 32 and net[0] in _OVERLAY:
            uris.add(f"tcp://{net[0]}:{PEER_PORT}")
    return tuple(sorted(uris))


@dataclass(frozen=True)
class RouterState:
    """``networks/<h>.mycelium.json``: the running router, the peers it was given, and its
    /64 (asked of ``mycelium inspect`` once)."""

    pid: int = 0
    start_time: int = 0
    peers: tuple[str, ...] = ()
    subnet: str = ""


class MyceliumRouter:
    """A network's mycelium router and bridge on this node. The caller (PrivateNetworks)
    serialises calls and owns the router namespace."""

    def __init__(
        self,
        binary: Path | None,
        secret: bytes,
        state_dir: Path,
        h: str,
        router_netns: str,
        node: str | None,
    ) -> None:
        self.binary = binary
        self.secret = secret
        self.dir = state_dir
        self.netns = router_netns
        self.node_netns = node
        self.bridge = f"zy{h}"
        self.veth = f"zx{h}"
        self.key_path = state_dir / f"{h}.mycelium.key"
        self.state_path = state_dir / f"{h}.mycelium.json"
        self.log_path = state_dir / f"{h}.mycelium.log"

    def require(self, where: str) -> Path:
        if self.binary is None:
            raise FailedPrecondition(
                f"{where}: this node has no mycelium router (the mycelium binary, --mycelium)"
            )
        return self.binary

    # ------------------------------------------------------------------ state

    def _load(self) -> RouterState:
        if not self.state_path.exists():
            return RouterState()
        data = json.loads(self.state_path.read_text())
        return RouterState(
            data["pid"], data["start_time"], tuple(data["peers"]), data.get("subnet", "")
        )

    def _save(self, state: RouterState) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state)))
        os.replace(tmp, self.state_path)

    def _ref(self, state: RouterState) -> ProcessRef | None:
        return ProcessRef(state.pid, state.start_time, str(self.key_path)) if state.pid else None

    def _running(self, state: RouterState) -> bool:
        ref = self._ref(state)
        return ref is not None and ref.alive() and link_exists(DEVICE, self.netns)

    def _write_key(self) -> None:
        if not self.key_path.exists():
            fd = os.open(self.key_path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.secret)
            os.replace(self.key_path.with_suffix(".tmp"), self.key_path)

    def _inspect(self, binary: Path) -> ipaddress.IPv6Network:
        """The /64 mycelium routes to this router, derived from its key by mycelium."""
        argv = [str(binary), "inspect", "--json", "--key-file", str(self.key_path)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        _check(out, "mycelium inspect")
        address = ipaddress.IPv6Address(json.loads(out.stdout)["address"])
        return ipaddress.IPv6Network(f"{address}/64", strict=False)

    # ------------------------------------------------------------------ router

    def _start(self, binary: Path, peers: tuple[str, ...]) -> RouterState:
        argv = [
            *netns_argv(self.netns), str(binary), "--key-file", str(self.key_path),
            "--tun-name", DEVICE, "--disable-peer-discovery", "--disable-quic",
            "--tcp-listen-port", str(PEER_PORT),
            *(["--peers", *peers] if peers else []),
        ]  # fmt: skip
        ref = spawn_detached(argv, self.log_path, marker=str(self.key_path))
        wait_for_link(ref, DEVICE, self.netns, f"mycelium router of {self.netns}")
        log.info("mycelium router started", netns=self.netns, pid=ref.pid, peers=list(peers))
        state = dataclasses.replace(
            self._load(), pid=ref.pid, start_time=ref.start_time, peers=peers
        )
        self._save(state)
        return state

    def stop(self) -> None:
        state = self._load()
        ref = self._ref(state)
        if ref is not None:
            asyncio.run(terminate(ref))  # callers run in worker threads, with no loop
            log.info("mycelium router stopped", netns=self.netns, pid=ref.pid)
        if self.state_path.exists():
            self._save(dataclasses.replace(state, pid=0, start_time=0))

    def ensure(self, peers: tuple[str, ...], where: str) -> ipaddress.IPv6Network:
        """Router, bridge and gateway up (idempotent, also after a reboot); the /64."""
        binary = self.require(where)
        self._write_key()
        state = self._load()
        if not state.subnet:
            state = dataclasses.replace(state, subnet=str(self._inspect(binary)))
            self._save(state)
        subnet = ipaddress.IPv6Network(state.subnet)
        if not self._running(state) or state.peers != peers:
            self.stop()
            state = self._start(binary, peers)
        node = self.node_netns
        if not link_exists(self.bridge, node):
            _check(_ip(node, "link", "add", self.bridge, "type", "bridge"), self.bridge)
        _check(_ip(node, "link", "set", self.bridge, "addrgenmode", "none", "up"), self.bridge)
        if not link_exists(self.veth, node):
            if link_exists(ROUTER_PORT, self.netns):  # its node end went with the node netns
                _check(_ip(self.netns, "link", "del", ROUTER_PORT), ROUTER_PORT)
            veth = ["type", "veth", "peer", "name", ROUTER_PORT, "netns", self.netns]
            _check(_ip(node, "link", "add", self.veth, *veth), self.veth)
        _check(_ip(node, "link", "set", self.veth, "addrgenmode", "none"), self.veth)
        _check(_ip(node, "link", "set", self.veth, "master", self.bridge, "up"), self.veth)
        gw = f"{gateway(subnet)}/64"
        _check(_ip(self.netns, "-6", "addr", "replace", gw, "dev", ROUTER_PORT, "nodad"), gw)
        _check(_ip(self.netns, "link", "set", ROUTER_PORT, "up"), ROUTER_PORT)
        return subnet

    def keep(self, peers: tuple[str, ...]) -> None:
        """With each peer update (the controller sends them every few seconds): a router
        that died is started again, and one whose peers changed restarts with them (its
        guests keep their addresses). A network without mycelium NICs has no router."""
        state = self._load()
        if not self.state_path.exists() or (state.peers == peers and self._running(state)):
            return
        if state.pid and not self._running(state):
            log.warning("mycelium router gone, starting it again", netns=self.netns, pid=state.pid)
        self.stop()
        self._start(self.require("mycelium peers"), peers)

    def remove(self) -> None:
        """Router, bridge and veth go; the key file too (it is derived again when needed)."""
        self.stop()
        for link in (self.veth, self.bridge):
            if link_exists(link, self.node_netns):
                _check(_ip(self.node_netns, "link", "del", link), link)
        for path in (self.key_path, self.state_path, self.log_path):
            path.unlink(missing_ok=True)
