"""Planetary NICs: the node's Yggdrasil router and the bridge its guests join, as zos has
``br-ygg``.

One router per node (the Debian ``yggdrasil`` daemon), started in the node's namespace
with the first planetary NIC and stopped with the last, listening on the underlay
(``tls://<underlay>:9943``) and dialling the other nodes the controller names
(``ApplyPlanetary``; multicast discovery is off). Its key is made once
(``<state-dir>/yggdrasil/key.json``, 0600): the node keeps its addresses across
restarts. The router's TUN device ``zyg0`` holds the node's 2xx:: address and routes
200::/7; the bridge ``zygg`` holds ``<node's 300::/64>::1`` and the guests' taps, and the
node forwards between them. A guest's address is that /64 with its NIC's MAC as the low
48 bits, its route 200::/7 via ``::1``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.agent.errors import FailedPrecondition
from controller.agent.network.local import (
    _check,
    _ip,
    create_tap,
    delete_tap,
    link_exists,
    netns_argv,
    wait_for_link,
)
from controller.agent.runtime.procs import ProcessRef, spawn_detached, terminate

log = structlog.get_logger(__name__)

BRIDGE = "zygg"
DEVICE = "zyg0"
PORT = 9943
ROUTED = ipaddress.IPv6Network("200::/7")


def guest_address(subnet: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The node's /64 with the MAC as the low 48 bits (never ::1: a local MAC is not 1)."""
    return subnet.network_address + int(mac.replace(":", ""), 16)


@dataclass(frozen=True)
class RouterState:
    """``<state-dir>/yggdrasil/state.json``: the peers last applied and the running router."""

    peers: tuple[str, ...] = ()
    pid: int = 0
    start_time: int = 0


class Planetary:
    """The node's Yggdrasil router and bridge (one per agent)."""

    def __init__(
        self, node_netns: str | None, state_dir: Path, binary: Path | None, underlay: str
    ) -> None:
        self.netns = node_netns
        self.dir = state_dir / "yggdrasil"
        self.binary = binary
        self.underlay = underlay
        # Taps joining and leaving, and peer updates, one at a time: the router starts
        # and stops with the bridge's first and last tap.
        self._lock = threading.Lock()

    def peer_uri(self) -> str:
        """Where other nodes' routers reach this one; '' when it cannot run."""
        if self.binary is None or not self.underlay:
            return ""
        host = f"[{self.underlay}]" if ":" in self.underlay else self.underlay
        return f"tls://{host}:{PORT}"

    # ------------------------------------------------------------------ state

    def _load(self) -> RouterState:
        path = self.dir / "state.json"
        if not path.exists():
            return RouterState()
        data = json.loads(path.read_text())
        return RouterState(tuple(data["peers"]), data["pid"], data["start_time"])

    def _save(self, state: RouterState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(state)))
        os.replace(tmp, self.dir / "state.json")

    def _ref(self, state: RouterState) -> ProcessRef | None:
        return ProcessRef(state.pid, state.start_time, str(self.dir)) if state.pid else None

    def _key(self, binary: Path) -> dict[str, str]:
        """The router's keys, made once."""
        path = self.dir / "key.json"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            out = subprocess.run([str(binary), "-genconf", "-json"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout  # fmt: skip
            conf = json.loads(out)
            fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({k: conf[k] for k in ("PrivateKey", "PublicKey")}, f)
            os.replace(path.with_suffix(".tmp"), path)
        key: dict[str, str] = json.loads(path.read_text())
        return key

    def subnet(self) -> ipaddress.IPv6Network:
        """The node's routed /64 (3xx::/64), derived from its key by yggdrasil itself."""
        binary = self._require("planetary")
        path = self.dir / "subnet"
        if not path.exists():
            conf = json.dumps(self._key(binary))
            argv = [str(binary), "-useconf", "-subnet"]
            out = subprocess.run(
                argv, input=conf, capture_output=True, text=True, timeout=30, check=True
            )
            path.write_text(out.stdout.strip())
        return ipaddress.IPv6Network(path.read_text().strip())

    def _require(self, where: str) -> Path:
        if self.binary is None or not self.underlay:
            raise FailedPrecondition(
                f"{where}: this node has no Yggdrasil router (the yggdrasil binary, "
                "--yggdrasil, and an underlay address are needed)"
            )
        return self.binary

    # ------------------------------------------------------------------ router

    def _config(self, binary: Path, peers: tuple[str, ...]) -> Path:
        conf: dict[str, object] = {
            **self._key(binary),
            "Listen": [self.peer_uri()],
            "Peers": list(peers),
            "InterfacePeers": {},
            "AllowedPublicKeys": [],
            "MulticastInterfaces": [],  # peers come from the controller only
            "AdminListen": "none",
            "IfName": DEVICE,
            "IfMTU": 65535,
            "NodeInfoPrivacy": True,
            "NodeInfo": None,
        }
        path = self.dir / "router.json"
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(conf, f)
        os.replace(path.with_suffix(".tmp"), path)
        return path

    def _start(self, binary: Path, state: RouterState) -> RouterState:
        config = self._config(binary, state.peers)
        argv = [*netns_argv(self.netns), str(binary), "-useconffile", str(config),
                "-logto", str(self.dir / "router.log")]  # fmt: skip
        ref = spawn_detached(argv, self.dir / "router.out", marker=str(self.dir))
        wait_for_link(ref, DEVICE, self.netns, f"yggdrasil router (see {self.dir})")
        sysctl = [*netns_argv(self.netns), "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]
        result = subprocess.run(sysctl, capture_output=True, text=True, timeout=30)
        _check(result, "node: IPv6 forwarding")
        # 200::/7 comes with the router's address as a prefix route, but a run here once
        # lacked it: set it explicitly, on every start (the device goes with the process).
        _check(_ip(self.netns, "-6", "route", "replace", str(ROUTED), "dev", DEVICE), DEVICE)
        log.info("yggdrasil router started", pid=ref.pid, peers=list(state.peers))
        state = dataclasses.replace(state, pid=ref.pid, start_time=ref.start_time)
        self._save(state)
        return state

    def _stop(self, state: RouterState) -> RouterState:
        ref = self._ref(state)
        if ref is not None:
            asyncio.run(terminate(ref))  # callers run in worker threads, with no loop
            log.info("yggdrasil router stopped", pid=ref.pid)
        state = dataclasses.replace(state, pid=0, start_time=0)
        self._save(state)
        return state

    def _running(self, state: RouterState) -> bool:
        ref = self._ref(state)
        return ref is not None and ref.alive() and link_exists(DEVICE, self.netns)

    def apply_peers(self, peers: list[str]) -> bool:
        """Keep the peers; a running router restarts with them when they changed (its
        guests keep their addresses). True when the router runs."""
        with self._lock:
            state = self._load()
            wanted = tuple(sorted(set(peers)))
            running = self._running(state)
            if wanted == state.peers:
                return running
            state = dataclasses.replace(state, peers=wanted)
            self._save(state)
            if running:
                binary = self._require("planetary peers")
                self._start(binary, self._stop(state))
            return running

    # ------------------------------------------------------------------ taps

    def attach(self, tap: str, where: str) -> ipaddress.IPv6Network:
        """``tap`` on the planetary bridge, router and bridge set up first; the node's /64."""
        with self._lock:
            binary = self._require(where)
            subnet = self.subnet()
            state = self._load()
            if not self._running(state):
                state = self._start(binary, self._stop(state))
            ns = self.netns
            if not link_exists(BRIDGE, ns):
                _check(_ip(ns, "link", "add", BRIDGE, "type", "bridge"), BRIDGE)
            # A link-local address of its own: without one the node sends no neighbour
            # solicitation for a guest, and forwarded packets to guests are dropped.
            _check(_ip(ns, "link", "set", BRIDGE, "addrgenmode", "eui64"), BRIDGE)
            gateway = f"{subnet.network_address + 1}/{subnet.prefixlen}"
            _check(_ip(ns, "-6", "addr", "replace", gateway, "dev", BRIDGE, "nodad"), BRIDGE)
            _check(_ip(ns, "link", "set", BRIDGE, "up"), BRIDGE)
            create_tap(tap, BRIDGE, ns)
            return subnet

    def detach(self, tap: str) -> None:
        """Remove ``tap``; the bridge and the router go with the last planetary tap."""
        with self._lock:
            delete_tap(tap, self.netns)
            if link_exists(BRIDGE, self.netns):
                out = _ip(self.netns, "-j", "link", "show", "master", BRIDGE)
                if json.loads(out.stdout or "[]"):
                    return
                _check(_ip(self.netns, "link", "del", BRIDGE), BRIDGE)
                log.info("planetary bridge removed", bridge=BRIDGE)
            state = self._load()
            if state.pid:
                self._stop(state)
