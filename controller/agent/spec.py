"""The agent's own model of a Zmachine spec: validated once, then plain dataclasses.

Validation here is about what the *node* must refuse: names that become host paths,
values no VMM can run. Everything the agent later writes lives under its state dir, so
every name that turns into a path component is checked against a strict pattern.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

from controller.agent.errors import InvalidSpec
from controller.agent.network.mycelium import check_seed

MIN_MEMORY = 128 << 20
MIB, GIB = 1 << 20, 1 << 30
_UID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
_VOLUME = re.compile(r"^[a-z0-9_-]{1,36}$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NETWORK = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FLIST_SCHEMES = ("http", "https", "file")
# The networks of the public, planetary and mycelium NICs in a machine's record (reserved
# in the API).
PUBLIC_NETWORK = "pub"
PLANETARY_NETWORK = "ygg"
MYCELIUM_NETWORK = "mycelium"


class RestartPolicy(StrEnum):
    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class VolumeKind(StrEnum):
    DISK = "disk"
    SHARE = "share"


@dataclass(frozen=True)
class Ref:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} (uid {self.uid})"


@dataclass(frozen=True)
class Volume:
    name: str
    kind: VolumeKind
    size_bytes: int = 0


@dataclass(frozen=True)
class Mount:
    name: str
    mountpoint: str


@dataclass(frozen=True)
class Interface:
    """A private interface. With a subnet it joins the network's bridge on this node
    (network/private.py); without one, the agent's node-local bridge (network/local.py)."""

    network: str
    ip: str = ""
    network_id: str = ""
    ip_range: str = ""
    subnet: str = ""
    ipv6_subnet: str = ""
    nat: bool = False
    listen_port: int = 0


@dataclass(frozen=True)
class PublicInterface:
    """A public NIC on the node's public bridge (network/public.py): CIDRs and gateways
    from a ZmachinePublicIPPool; either family may be absent."""

    ipv4: str = ""
    gateway4: str = ""
    ipv6: str = ""
    gateway6: str = ""


@dataclass(frozen=True)
class MachineSpec:
    flist: str
    cpu: int
    memory_bytes: int
    size_bytes: int = 0
    entrypoint: str = ""
    env: dict[str, str] = field(default_factory=dict)
    volumes: tuple[Volume, ...] = ()
    mounts: tuple[Mount, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    paused: bool = False
    hostname: str = ""
    ssh_keys: tuple[str, ...] = ()
    public: PublicInterface | None = None
    planetary: bool = False
    mycelium_seed: str = ""  # 12 hex digits; empty: no mycelium NIC

    def boot_hash(self) -> str:
        """Digest of everything that needs a new VM to change (all but ``paused``)."""
        data = dataclasses.asdict(dataclasses.replace(self, paused=False))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineSpec:
        return cls(
            **{
                **data,
                "volumes": tuple(
                    Volume(v["name"], VolumeKind(v["kind"]), v["size_bytes"])
                    for v in data["volumes"]
                ),
                "mounts": tuple(Mount(**m) for m in data["mounts"]),
                "interfaces": tuple(Interface(**i) for i in data["interfaces"]),
                "restart_policy": RestartPolicy(data["restart_policy"]),
                "ssh_keys": tuple(data["ssh_keys"]),
                "public": PublicInterface(**data["public"]) if data.get("public") else None,
            }
        )


def env_digest(env: dict[str, str]) -> str:
    """Digest of resolved env values: the agent reports it, the controller compares it with
    what it resolves now, so a changed Secret rolls out without a new generation."""
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:32]


def hostname_label(name: str) -> str:
    """An RFC 1123 label (the guest's hostname) from a Kubernetes name, which may hold dots
    and run to 253 characters: dots and anything else outside [a-z0-9-] become '-', and
    a name too long keeps its first 54 characters plus 8 hex of its hash, so two long
    names sharing a prefix still get different hostnames."""
    label = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if len(label) > 63:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        label = f"{label[:54].rstrip('-')}-{digest}"
    return label or "zmachine"


def min_root_size(cpu: int, memory_bytes: int) -> int:
    """zos's MinRootSize(): 2 GiB once cpu x memory reaches 8 GiB (integer maths), else
    500 MiB; the CRD's admission rule is the same."""
    return 2 * GIB if cpu * memory_bytes // (8 * GIB) >= 1 else 500 * MIB


def root_size(spec: MachineSpec) -> int:
    """zos's RootSize(): the writable root's size, spec.size or the minimum if larger."""
    return max(spec.size_bytes, min_root_size(spec.cpu, spec.memory_bytes))


def human_size(nbytes: int) -> str:
    """Bytes as the Kubernetes quantity a user wrote ("2Gi", "500Mi"), else plain bytes."""
    for unit, factor in (("Gi", GIB), ("Mi", MIB)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)


def validate_ref(ref: Ref) -> None:
    if not _UID.match(ref.uid):
        raise InvalidSpec(f"ref.uid {ref.uid!r}: must be a Kubernetes UID ([a-z0-9-], ≤64 chars)")
    if not ref.name or not ref.namespace:
        raise InvalidSpec(f"zmachine {ref}: ref.namespace and ref.name are required")


def validate_spec(ref: Ref, spec: MachineSpec) -> None:
    """Raise InvalidSpec naming the first offending field."""
    where = f"zmachine {ref.namespace}/{ref.name}"
    url = urlparse(spec.flist)
    if url.scheme not in FLIST_SCHEMES or not (url.netloc or url.path):
        raise InvalidSpec(
            f"{where}: spec.flist {spec.flist!r} must be an {'/'.join(FLIST_SCHEMES)} URL"
        )
    if url.scheme == "file" and ".." in url.path.split("/"):
        raise InvalidSpec(f"{where}: spec.flist {spec.flist!r} must not contain '..'")
    host_cpus = os.cpu_count() or 1
    if not 1 <= spec.cpu <= host_cpus:
        raise InvalidSpec(f"{where}: spec.cpu {spec.cpu} must be between 1 and {host_cpus}")
    if spec.memory_bytes < MIN_MEMORY:
        raise InvalidSpec(
            f"{where}: spec.memory {spec.memory_bytes} bytes is below {MIN_MEMORY >> 20} MiB"
        )
    if spec.hostname and not _HOSTNAME.match(spec.hostname):
        raise InvalidSpec(f"{where}: spec.hostname {spec.hostname!r} is not a DNS label")
    for key in spec.env:
        if not _ENV_KEY.match(key):
            raise InvalidSpec(f"{where}: spec.env key {key!r} is not a valid variable name")
    for i, k in enumerate(spec.ssh_keys):
        if "\n" in k or not k.strip():
            raise InvalidSpec(f"{where}: spec.sshKeys[{i}] must be one non-empty line")
    _validate_storage(where, spec)
    _validate_network(where, spec)


def _validate_storage(where: str, spec: MachineSpec) -> None:
    least = min_root_size(spec.cpu, spec.memory_bytes)
    if 0 < spec.size_bytes < least:
        # The same rule as the CRD's admission; a smaller root would be a quota zos refuses.
        raise InvalidSpec(
            f"{where}: spec.size {human_size(spec.size_bytes)} is below the minimum root size "
            f"{human_size(least)} for {spec.cpu} vCPU and {human_size(spec.memory_bytes)} "
            "memory (0 means the minimum)"
        )
    names: set[str] = set()
    for i, v in enumerate(spec.volumes):
        # Volume names become file names under the state dir and virtio-fs tags (≤36).
        if not _VOLUME.match(v.name):
            raise InvalidSpec(
                f"{where}: spec.volumes[{i}].name {v.name!r} must match [a-z0-9_-]{{1,36}} "
                "(it names a file under the agent's state dir)"
            )
        if v.name in names or v.name == "vroot":
            raise InvalidSpec(f"{where}: spec.volumes[{i}].name {v.name!r} is duplicate/reserved")
        if v.kind is VolumeKind.DISK and v.size_bytes <= 0:
            raise InvalidSpec(f"{where}: spec.volumes[{i}] is a disk and needs sizeBytes > 0")
        names.add(v.name)
    targets: set[str] = set()
    for i, m in enumerate(spec.mounts):
        if m.name not in names:
            raise InvalidSpec(f"{where}: spec.mounts[{i}].name {m.name!r} is not a volume")
        path = os.path.normpath(m.mountpoint)
        if not m.mountpoint.startswith("/") or path == "/" or path in targets:
            raise InvalidSpec(
                f"{where}: spec.mounts[{i}].mountpoint {m.mountpoint!r} must be an absolute "
                "guest path other than '/', used once"
            )
        targets.add(path)


def _validate_network(where: str, spec: MachineSpec) -> None:
    if len(spec.interfaces) > 1:
        raise InvalidSpec(f"{where}: spec.network.interfaces: at most one interface is supported")
    for i, nic in enumerate(spec.interfaces):
        if not _NETWORK.match(nic.network):
            raise InvalidSpec(
                f"{where}: spec.network.interfaces[{i}].network {nic.network!r} must be a DNS label"
            )
        field = f"{where}: spec.network.interfaces[{i}]"
        ip = None
        if nic.ip:
            try:
                ip = ipaddress.IPv4Address(nic.ip)
            except ValueError as exc:
                raise InvalidSpec(f"{field}.ip {nic.ip!r} is not IPv4") from exc
        if nic.subnet:
            validate_private(field, nic, ip)
    if spec.public is not None:
        _validate_public(f"{where}: spec.network.publicIP", spec.public)
    if spec.mycelium_seed:
        _validate_mycelium(f"{where}: spec.network.mycelium", spec)


def _validate_mycelium(field: str, spec: MachineSpec) -> None:
    """A valid seed, and a private interface on a placed network: its router runs there."""
    try:
        if not re.fullmatch(r"[0-9a-fA-F]{12}", spec.mycelium_seed):
            raise ValueError("it must be 12 hex digits")
        check_seed(bytes.fromhex(spec.mycelium_seed))
    except ValueError as exc:
        raise InvalidSpec(f"{field}.hexSeed {spec.mycelium_seed!r}: {exc}") from exc
    if not any(nic.subnet for nic in spec.interfaces):
        raise InvalidSpec(f"{field}: needs a private interface on a network placed on this node")


def _validate_public(field: str, pub: PublicInterface) -> None:
    """Each family given is an address with its prefix and a gateway inside that prefix."""
    if not pub.ipv4 and not pub.ipv6:
        raise InvalidSpec(f"{field}: neither an IPv4 nor an IPv6 address is given")
    for family, cidr, gw in ((4, pub.ipv4, pub.gateway4), (6, pub.ipv6, pub.gateway6)):
        if not cidr:
            continue
        try:
            iface = ipaddress.ip_interface(cidr)
            gateway = ipaddress.ip_address(gw)
        except ValueError as exc:
            raise InvalidSpec(f"{field}: IPv{family} {cidr!r} via {gw!r}: {exc}") from exc
        if iface.version != family or "/" not in cidr:
            raise InvalidSpec(f"{field}: {cidr!r} is not an IPv{family} address with a prefix")
        if gateway not in iface.network or gateway == iface.ip:
            raise InvalidSpec(
                f"{field}: IPv{family} {cidr} needs a gateway of its own prefix, not {gw!r}"
            )


def validate_planetary_peer(field: str, uri: str) -> None:
    """A router to dial: tls://<IP>:<port> (what agents report), nothing else."""
    url = urlparse(uri)
    try:
        ipaddress.ip_address(url.hostname or "")
        port = url.port
    except ValueError as exc:
        raise InvalidSpec(f"{field} {uri!r}: not tls://<IP>:<port>: {exc}") from exc
    if url.scheme != "tls" or port is None or url.path or url.query:
        raise InvalidSpec(f"{field} {uri!r}: not tls://<IP>:<port>")


def validate_private(field: str, nic: Interface, ip: ipaddress.IPv4Address | None) -> None:
    """An interface on a ZmachineNetwork: its addresses fit together; `ip` is a guest's."""
    try:
        ip_range = ipaddress.IPv4Network(nic.ip_range)
        subnet = ipaddress.IPv4Network(nic.subnet)
        v6 = ipaddress.IPv6Network(nic.ipv6_subnet)
    except ValueError as exc:
        raise InvalidSpec(f"{field}: the network's addresses are malformed: {exc}") from exc
    if subnet.prefixlen != 24 or not subnet.subnet_of(ip_range) or v6.prefixlen != 64:
        raise InvalidSpec(
            f"{field}: subnet {subnet} must be a /24 of {ip_range}, ipv6 subnet {v6} a /64"
        )
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", nic.network_id):
        raise InvalidSpec(f"{field}: network id {nic.network_id!r} is malformed")
    if not 1 <= nic.listen_port <= 65535:
        raise InvalidSpec(f"{field}: listen port {nic.listen_port} is out of range")
    if ip is not None and (ip not in subnet or ip == subnet.network_address + 1):
        raise InvalidSpec(
            f"{field}.ip {ip} is not a guest address of this node's subnet {subnet} "
            "(its .1 is the gateway)"
        )
