"""virtiofsd: one daemon per virtio-fs share, detached so it outlives the agent.

The Rust ``virtiofsd`` (the maintained one; hack/build-virtiofsd.sh builds the pinned
version) is the default: the path given to the agent (``--virtiofsd``), else ``virtiofsd``
on PATH. Only without either does the agent fall back, with a warning, to QEMU 7.2's
deprecated C daemon from Debian 12 (``/usr/lib/qemu/virtiofsd``, same vhost-user
protocol, different flags). Either serves a
single VMM connection and exits when the VMM disconnects, so every VMM (re)start needs
fresh daemons: call ``start_virtiofsd`` right before starting the hypervisor.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from controller.agent.errors import Unavailable
from controller.agent.guest.vmconfig import FsShare
from controller.agent.hypervisor.base import log_tail, still_running
from controller.agent.runtime.procs import ProcessRef, exit_code, spawn_detached

log = structlog.get_logger(__name__)

QEMU_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


class VirtiofsError(Unavailable):
    """virtiofsd is missing, exited, or did not create its socket in time."""


class Flavor(StrEnum):
    RUST = "rust"
    QEMU = "qemu"  # the deprecated C daemon shipped by qemu-system-common <= 7.2


@dataclass(frozen=True)
class Virtiofsd:
    path: Path
    flavor: Flavor

    def argv(self, share: FsShare) -> list[str]:
        # xattr: container images carry file capabilities and SELinux/ACL xattrs.
        if self.flavor is Flavor.RUST:
            return [
                str(self.path),
                "--socket-path",
                str(share.socket),
                "--shared-dir",
                str(share.shared_dir),
                "--xattr",
                "--cache",
                "auto",
            ]
        return [
            str(self.path),
            f"--socket-path={share.socket}",
            "-o",
            f"source={share.shared_dir}",
            "-o",
            "cache=auto",
            "-o",
            "xattr",
        ]


def find_virtiofsd(rust: Path | None = None) -> Virtiofsd:
    """The Rust daemon at ``rust`` (must exist), else on PATH, else the C one."""
    if rust is not None:
        if not rust.is_file():
            raise VirtiofsError(f"--virtiofsd {rust}: no such file (hack/build-virtiofsd.sh)")
        return Virtiofsd(rust, Flavor.RUST)
    on_path = shutil.which("virtiofsd")
    if on_path:
        return Virtiofsd(Path(on_path), Flavor.RUST)
    if QEMU_VIRTIOFSD.is_file():
        log.warning(
            "using the deprecated C virtiofsd; build the Rust one (hack/build-virtiofsd.sh) "
            "and pass --virtiofsd",
            path=str(QEMU_VIRTIOFSD),
        )
        return Virtiofsd(QEMU_VIRTIOFSD, Flavor.QEMU)
    raise VirtiofsError(
        f"no virtiofsd: neither 'virtiofsd' on PATH nor {QEMU_VIRTIOFSD} (qemu-system-common)"
    )


async def start_virtiofsd(
    share: FsShare, log_path: Path, daemon: Virtiofsd | None = None, within: float = 10.0
) -> ProcessRef:
    """Start virtiofsd for ``share`` in its own session and wait for its socket.

    The returned ProcessRef's marker is the socket path, unique per VM and share.
    """
    daemon = daemon or find_virtiofsd()
    if not share.shared_dir.is_dir():
        raise VirtiofsError(f"share {share.tag!r}: {share.shared_dir} is not a directory")
    share.socket.parent.mkdir(parents=True, exist_ok=True)
    share.socket.unlink(missing_ok=True)  # a stale socket would look ready at once
    try:
        ref = spawn_detached(daemon.argv(share), log_path, marker=str(share.socket))
    except OSError as exc:
        raise VirtiofsError(f"share {share.tag!r}: cannot run {daemon.path}: {exc}") from exc
    bound = log.bind(tag=share.tag, socket=str(share.socket), pid=ref.pid)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _is_socket(share.socket):
            bound.info("virtiofsd ready", flavor=daemon.flavor.value)
            return ref
        if not still_running(ref):
            raise VirtiofsError(
                f"share {share.tag!r}: virtiofsd exited (status {exit_code(ref)}) before "
                f"creating {share.socket}: {log_tail(log_path)}"
            )
        await asyncio.sleep(0.05)
    raise VirtiofsError(
        f"share {share.tag!r}: virtiofsd did not create {share.socket} within {within:.0f}s"
    )


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False
