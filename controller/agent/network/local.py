"""Guest NICs on the host side: taps with stable names and MACs, and node-local IPs.

Taps are persistent (``ip tuntap add``) so they exist before the VMM opens them and
survive a VMM restart; they join the configured bridge, inside the configured network
namespace when one is given (the VMM then runs in that namespace too, see
``netns_argv``). Everything goes through iproute2, synchronously: each call is a few
milliseconds, so async callers can use ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from controller.agent.errors import ResourceExhausted, Unavailable
from controller.agent.runtime.procs import ProcessRef, terminate

log = structlog.get_logger(__name__)

IFNAMSIZ = 15


class NetworkError(Unavailable):
    """A tap or bridge operation failed on the node."""


def tap_name(uid: str, index: int, kind: str = "n") -> str:
    """``zm`` + 10 hex chars of sha256(uid) + ``<kind><index>``: stable and at most 15 chars.
    ``kind``: ``n`` private NICs, ``p`` the public one (zos: ``t-``/``p-``)."""
    name = f"zm{hashlib.sha256(uid.encode()).hexdigest()[:10]}{kind}{index}"
    if len(name) > IFNAMSIZ:
        raise ValueError(f"nic index {index} of {uid!r} is too large for a tap name")
    return name


def mac_address(uid: str, index: int) -> str:
    """A stable locally administered unicast MAC derived from uid and nic index."""
    digest = hashlib.sha256(f"{uid}:{index}".encode()).digest()
    first = (digest[0] | 0x02) & 0xFE  # set "locally administered", clear "multicast"
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


# zos keeps MACs out of three reserved stretches; each range is (low bound of the first two
# bytes, high bound of the tail the range check compares), as its ifaceutil package does.
_MAC_RANGES = ((b"\x00\x03", b"\x00\x51\xff"), (b"\x00\x54", b"\x90\x00\xff"))
_MAC_LAST = (b"\x90\x02", b"\xff\xff\xff\xff\xff\xfe")


def _zos_mac_valid(mac: bytes) -> bool:
    (low1, high1), (low2, high2) = _MAC_RANGES
    if mac[3:] <= high1:
        return mac[:2] >= low1
    if mac[3:] <= high2:
        return mac[:2] >= low2 and mac[:2] != b"\x33\x33"
    return mac <= _MAC_LAST[1] and mac[:2] >= _MAC_LAST[0]


def zos_mac(data: str) -> str:
    """The MAC zos derives from a string (its public, yggdrasil and mycelium NICs): 6 bytes
    of md5, locally administered and unicast, sliding along the digest (then rehashing it)
    until they leave the reserved ranges."""
    data_bytes = data.encode()
    while True:
        # Marking a byte changes the digest itself, which is what a second round hashes.
        digest = bytearray(hashlib.md5(data_bytes, usedforsecurity=False).digest())
        for offset in range(len(digest) - 5):
            digest[offset] = (digest[offset] | 2) & 0xFE
            mac = bytes(digest[offset : offset + 6])
            if _zos_mac_valid(mac):
                return ":".join(f"{b:02x}" for b in mac)
        data_bytes = bytes(digest)


def netns_argv(netns: str | None) -> list[str]:
    """Prefix that runs a command inside ``netns`` (empty for the current namespace).

    nsenter enters the network namespace only. ``ip netns exec`` would also give the VMM a
    private copy of the host's mount table, and that copy would pin every mount of the time,
    other VMs' root images included: their loop devices could never be detached while
    this VMM runs (and lazily unmounted overlays and FUSE mounts would linger in it)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []


def _ip(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise NetworkError(f"{what}: {' '.join(result.args)}: {result.stderr.strip()}")


def find_binary(name: str, configured: Path | None) -> Path | None:
    """A node daemon's binary: the configured path, else ``name`` on PATH, else None."""
    if configured is not None:
        return configured
    found = shutil.which(name)
    return Path(found) if found else None


def link_exists(name: str, netns: str | None = None) -> bool:
    return _ip(netns, "link", "show", "dev", name).returncode == 0


def wait_for_link(ref: ProcessRef, device: str, netns: str | None, what: str) -> None:
    """Wait for a daemon just started to bring up its device; stop it if it never does."""
    deadline = time.monotonic() + 15
    while not link_exists(device, netns):
        if time.monotonic() > deadline or not ref.alive():
            asyncio.run(terminate(ref))  # callers run in worker threads, with no loop
            raise NetworkError(f"{what} did not bring up {device}")
        time.sleep(0.1)


def create_tap(name: str, bridge: str, netns: str | None = None, mtu: int = 1500) -> None:
    """Create (or keep) persistent tap ``name``, enslave it to ``bridge`` and set it up."""
    where = f"tap {name} (bridge {bridge}, netns {netns or 'host'})"
    if not link_exists(bridge, netns):
        raise NetworkError(f"{where}: bridge {bridge} does not exist")
    if not link_exists(name, netns):
        _check(_ip(netns, "tuntap", "add", "dev", name, "mode", "tap"), where)
        log.info("tap created", tap=name, bridge=bridge, netns=netns)
    # Host side of a guest NIC needs no IPv6 link-local address of its own.
    _check(_ip(netns, "link", "set", "dev", name, "addrgenmode", "none"), where)
    _check(_ip(netns, "link", "set", "dev", name, "mtu", str(mtu), "master", bridge, "up"), where)


def delete_tap(name: str, netns: str | None = None) -> None:
    """Remove tap ``name``; a tap that is already gone is not an error."""
    if link_exists(name, netns):
        _check(_ip(netns, "link", "del", "dev", name), f"tap {name}")
        log.info("tap deleted", tap=name, netns=netns)


class IPAllocator:
    """Node-local IPv4 addresses from one CIDR, persisted as ``{owner: address}`` JSON.

    The first host address is the gateway (the bridge's address) and is never handed
    out. Allocation is idempotent per owner and safe across processes (flock).
    """

    def __init__(self, cidr: str, state_file: Path) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr)
        except ValueError as exc:
            raise ValueError(f"ip allocator: {cidr!r} is not an IPv4 network") from exc
        if self.network.num_addresses < 4:
            raise ValueError(f"ip allocator: {cidr} has no room for guests")
        self.state_file = state_file
        self.gateway = self.network.network_address + 1

    def interface(self, address: ipaddress.IPv4Address) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{address}/{self.network.prefixlen}")

    def allocate(self, owner: str) -> ipaddress.IPv4Address:
        with self._locked() as table:
            if owner in table:
                return ipaddress.IPv4Address(table[owner])
            used = set(table.values())
            for host in self.network.hosts():
                if host != self.gateway and str(host) not in used:
                    table[owner] = str(host)
                    log.info("ip allocated", owner=owner, ip=str(host))
                    return host
        raise ResourceExhausted(f"ip allocator: no free address left in {self.network}")

    def reserve(self, owner: str, address: str) -> ipaddress.IPv4Address:
        """Record a spec-given address so it is never allocated to anyone else."""
        ip = ipaddress.IPv4Address(address)
        if ip not in self.network or ip == self.gateway:
            raise ValueError(f"ip allocator: {ip} is not a usable host of {self.network}")
        with self._locked() as table:
            holder = next((o for o, a in table.items() if a == str(ip) and o != owner), None)
            if holder is not None:
                raise ResourceExhausted(f"ip allocator: {ip} is already used by {holder}")
            table[owner] = str(ip)
        return ip

    def release(self, owner: str) -> None:
        with self._locked() as table:
            if table.pop(owner, None) is not None:
                log.info("ip released", owner=owner)

    def lookup(self, owner: str) -> ipaddress.IPv4Address | None:
        with self._locked() as table:
            return ipaddress.IPv4Address(table[owner]) if owner in table else None

    @contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table: dict[str, str] = (
                json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            )
            before = dict(table)
            yield table
            if table != before:
                fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".ipam-")
                with os.fdopen(fd, "w") as f:
                    json.dump(table, f, indent=1, sort_keys=True)
                os.replace(tmp, self.state_file)
