"""The NoCloud ``cidata`` seed disk: a small vfat image the guest reads at boot.

Files (all also readable by real cloud-init in VM-mode guests):

* ``meta-data``      instance-id, local-hostname
* ``network-config`` netplan v2: ethernets matched by MAC, static addresses, gateways,
                     routes, nameservers (on the first interface)
* ``user-data``      ``#cloud-config`` with root's ssh_authorized_keys and fstab-style mounts
* ``zosrc``          shell, sourced by our initramfs: ``export K='v'`` per env var, nothing else
* ``entrypoint``     shell, sourced by our initramfs: ``set -- 'argv0' 'arg1' ...`` (empty without
                     an entrypoint); apart from zosrc so no env name can change it
* ``workdir``        the entrypoint's working directory inside the root, one line (``/`` by
                     default): an image's working directory, as a container runtime uses it

The image is built with mkfs.vfat + mcopy (mtools), so no loop mount and no root needed.
The YAML stays in the block subset that hack/initramfs/seed.awk reads.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.agent.errors import InvalidSpec, Unavailable

LABEL = "cidata"
MIN_SIZE = 2 << 20
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# mtools refuses images whose geometry does not match a floppy table without this.
_MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


class SeedError(Unavailable):
    """The seed image could not be written (mkfs.vfat/mcopy failed)."""


@dataclass(frozen=True)
class Route:
    to: str  # CIDR, or "default"
    via: str


@dataclass(frozen=True)
class Interface:
    mac: str
    addresses: Sequence[str]  # CIDRs, e.g. "10.1.2.3/24"
    gateway4: str | None = None
    gateway6: str | None = None
    routes: Sequence[Route] = ()


@dataclass(frozen=True)
class Mount:
    source: str  # "vdb" (a disk) or a virtio-fs tag
    target: str  # absolute path in the guest, not "/"
    fstype: str = "auto"  # "virtiofs" for shares
    options: str = "defaults"


@dataclass(frozen=True)
class SeedConfig:
    instance_id: str
    hostname: str
    interfaces: Sequence[Interface] = ()
    nameservers: Sequence[str] = ()
    ssh_keys: Sequence[str] = ()
    mounts: Sequence[Mount] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: str = ""  # empty: the initramfs boots /sbin/init
    workdir: str = "/"


def ssh_keys_from_env(value: str) -> list[str]:
    """zos' SSH_KEY convention: keys separated by newlines or commas."""
    return [k.strip() for k in re.split(r"[\n,]", value) if k.strip()]


def render(config: SeedConfig) -> dict[str, str]:
    """The seed's files by name; raises InvalidSpec naming the offending field."""
    if not _HOSTNAME.match(config.hostname):
        raise InvalidSpec(f"seed.hostname {config.hostname!r} must be a DNS label (a-z, 0-9, -)")
    return {
        "meta-data": _yaml({"instance-id": config.instance_id, "local-hostname": config.hostname}),
        "network-config": _yaml(_network(config)),
        "user-data": "#cloud-config\n" + _yaml(_user_data(config)),
        "zosrc": _zosrc(config),
        "entrypoint": _entrypoint(config),
        "workdir": _workdir(config.workdir),
    }


def write_seed(config: SeedConfig, path: Path) -> Path:
    """Write the seed image to ``path`` (replaced atomically) and return it."""
    files = render(config)
    payload = sum(len(v.encode()) for v in files.values())
    size_kib = max(MIN_SIZE, payload + (1 << 20)) // 1024
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.unlink(tmp)  # mkfs.vfat -C insists on creating the file itself
    try:
        with tempfile.TemporaryDirectory(prefix="zm-seed-") as src:
            for name, text in files.items():
                Path(src, name).write_text(text, encoding="utf-8")
            _run(["mkfs.vfat", "-C", "-n", LABEL, tmp, str(size_kib)], path)
            _run(
                ["mcopy", "-i", tmp, "-o", *(str(Path(src, n)) for n in files), "::/"],
                path,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _run(argv: list[str], target: Path) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, env=_MTOOLS_ENV, timeout=30)
    except FileNotFoundError as exc:
        raise SeedError(f"seed {target}: {argv[0]} not installed (dosfstools/mtools)") from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()
        raise SeedError(f"seed {target}: {argv[0]} failed: {detail}") from exc


def _yaml(data: Mapping[str, Any]) -> str:
    # Block style, no line folding: the initramfs' awk parser reads one item per line.
    # allow_unicode: UTF-8 as is, since the parser does not decode YAML's \u escapes.
    return yaml.safe_dump(
        dict(data), default_flow_style=False, sort_keys=False, width=1 << 16, allow_unicode=True
    )


def _network(config: SeedConfig) -> dict[str, Any]:
    nameservers = [_ip(n, "seed.nameservers") for n in config.nameservers]
    ethernets: dict[str, Any] = {}
    for i, nic in enumerate(config.interfaces):
        where = f"seed.interfaces[{i}]"
        mac = nic.mac.lower()
        if not _MAC.match(mac):
            raise InvalidSpec(f"{where}.mac {nic.mac!r} is not a MAC address")
        eth: dict[str, Any] = {"match": {"macaddress": mac}, "dhcp4": False}
        eth["addresses"] = [_cidr(a, f"{where}.addresses") for a in nic.addresses]
        for key, gw in (("gateway4", nic.gateway4), ("gateway6", nic.gateway6)):
            if gw:
                eth[key] = _ip(gw, f"{where}.{key}")
        if nic.routes:
            eth["routes"] = [
                {
                    "to": r.to if r.to == "default" else _cidr(r.to, f"{where}.routes.to"),
                    "via": _ip(r.via, f"{where}.routes.via"),
                }
                for r in nic.routes
            ]
        if i == 0 and nameservers:
            eth["nameservers"] = {"addresses": nameservers}
        ethernets[f"eth{i}"] = eth
    return {"version": 2, "ethernets": ethernets}


def _user_data(config: SeedConfig) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if config.ssh_keys:
        for key in config.ssh_keys:
            if "\n" in key or not key.strip():
                raise InvalidSpec(f"seed.ssh_keys: {key!r} must be one non-empty line")
        data["users"] = [{"name": "root", "ssh_authorized_keys": list(config.ssh_keys)}]
    mounts = []
    for i, m in enumerate(config.mounts):
        if not m.target.startswith("/") or m.target.rstrip("/") == "":
            raise InvalidSpec(f"seed.mounts[{i}].target {m.target!r} must be absolute, not '/'")
        for name in ("source", "target", "fstype", "options"):
            value = getattr(m, name)
            if not value or any(c.isspace() for c in value):
                raise InvalidSpec(f"seed.mounts[{i}].{name} {value!r} must be one word")
        mounts.append([m.source, m.target, m.fstype, m.options, "0", "0"])
    if mounts:
        data["mounts"] = mounts
    return data


def _zosrc(config: SeedConfig) -> str:
    lines = ["# zmachine env, sourced by the initramfs in the entrypoint's own shell"]
    for name, value in config.env.items():
        if not _ENV_NAME.match(name):
            raise InvalidSpec(f"seed.env: {name!r} is not a valid environment variable name")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def _entrypoint(config: SeedConfig) -> str:
    """``set -- argv0 args...``; empty without an entrypoint (the root's /sbin/init)."""
    header = "# zmachine entrypoint: argv, sourced by the initramfs\n"
    if not config.entrypoint.strip():
        return header
    try:
        argv = shlex.split(config.entrypoint)
    except ValueError as exc:
        raise InvalidSpec(
            f"seed.entrypoint {config.entrypoint!r} is not a valid command: {exc}"
        ) from exc
    return header + " ".join(["set --", *(shlex.quote(a) for a in argv)]) + "\n"


def _workdir(path: str) -> str:
    # Read by the init with `read -r`: one line; resolved inside the root there.
    if not path.startswith("/") or "\n" in path or "\0" in path:
        raise InvalidSpec(f"seed.workdir {path!r} must be an absolute path on one line")
    return path + "\n"


def _cidr(value: str, where: str) -> str:
    if "/" not in value:
        raise InvalidSpec(f"{where}: {value!r} needs a prefix length (e.g. /24)")
    try:
        return str(ipaddress.ip_interface(value))
    except ValueError as exc:
        raise InvalidSpec(f"{where}: {value!r} is not an address/prefix") from exc


def _ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise InvalidSpec(f"{where}: {value!r} is not an IP address") from exc
