"""Hypervisor-neutral description of one VM, boot-mode detection and the kernel command line.

Both drivers (cloud-hypervisor, QEMU) turn a ``VMConfig`` into their own command line; the
agent builds the ``VMConfig`` from the spec, the mounted root and ``detect_boot``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

from controller.agent.errors import InvalidSpec

ROOT_TAG = "vroot"
# Same defaults as zos: serial console, reboot via keyboard controller, reboot 1 s after
# a panic (the hypervisor keeps running, so a panic is a reboot, not an exit).
BASE_ARGS = ("rw", "console=ttyS0", "reboot=k", "panic=1")
MAX_TAG_BYTES = 36  # virtio-fs tag limit (cloud-hypervisor, virtiofs spec)
MIN_MEMORY_MIB = 64
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
RUN_LOG = "vmm-run.log"  # in state_dir: the VMM's own log of its current run
# x86's COMMAND_LINE_SIZE (2048, with the NUL): the kernel silently cuts anything longer.
MAX_CMDLINE = 2047
NONCE_PARAM = "zmachine.nonce"  # dotted: the kernel keeps it out of init's env and argv


class BootMode(StrEnum):
    CONTAINER = "container"  # our kernel + initramfs; the flist is only the root filesystem
    VM = "vm"  # the flist's own /boot/vmlinuz (+ /boot/initrd.img), root still over virtio-fs
    IMAGE = "image"  # /image.raw copied onto the first disk; firmware boots its loader


@dataclass(frozen=True)
class FsShare:
    tag: str
    socket: Path  # vhost-user socket virtiofsd listens on
    shared_dir: Path


@dataclass(frozen=True)
class Disk:
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class Nic:
    tap: str
    mac: str


@dataclass(frozen=True)
class VMConfig:
    vm_id: str
    cpus: int
    memory_mib: int
    kernel: Path | None  # None: no direct kernel boot, firmware boots disks[0] (image mode)
    initrd: Path | None
    cmdline: str  # only with a kernel
    shares: list[FsShare]
    disks: list[Disk]
    nics: list[Nic]
    serial_log: Path  # guest serial console output (appended)
    api_socket: Path  # cloud-hypervisor REST API, or QEMU's QMP
    state_dir: Path  # pid file, VMM log
    netns: str | None = None  # taps live there, so the VMM runs there too
    serial_pty: bool = False  # also expose the serial console as a PTY (web console)

    @property
    def disk_boot(self) -> bool:
        """No kernel: the firmware boots the loader on disks[0] (image mode)."""
        return self.kernel is None

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "vmm.pid"

    @property
    def vmm_log(self) -> Path:
        return self.state_dir / "vmm.log"

    @property
    def events_file(self) -> Path:
        """The VMM's lifecycle events: cloud-hypervisor's --event-monitor file (it
        truncates it at each start), or the QMP events the agent saw (JSON lines)."""
        return self.state_dir / "vmm-events.json"

    @property
    def run_log(self) -> Path:
        """The VMM's own log of its current run, where it can keep one apart from
        ``vmm_log`` (cloud-hypervisor's --log-file, truncated at each start)."""
        return self.state_dir / RUN_LOG

    @property
    def exit_file(self) -> Path:
        """Why the last VMM ended, once the agent knows (hypervisor.ExitRecord)."""
        return self.state_dir / "vmm-exit.json"

    def validate(self) -> None:
        """Raise InvalidSpec naming the first field that no hypervisor would accept."""
        where = f"vm {self.vm_id!r}"
        if not self.vm_id or "/" in self.vm_id or "," in self.vm_id:
            raise InvalidSpec(f"{where}: vm_id must be non-empty, without '/' or ','")
        if self.cpus < 1:
            raise InvalidSpec(f"{where}: cpus must be >= 1, got {self.cpus}")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise InvalidSpec(f"{where}: memory_mib must be >= {MIN_MEMORY_MIB}")
        for path, name in ((self.kernel, "kernel"), (self.initrd, "initrd")):
            if path is not None and not path.is_file():
                raise InvalidSpec(f"{where}: {name} {path} is not a file")
        if self.kernel is None and (self.initrd is not None or not self.disks):
            raise InvalidSpec(f"{where}: a disk boot needs a boot disk and no initrd")
        tags = [s.tag for s in self.shares]
        for tag in tags:
            if not tag or len(tag.encode()) > MAX_TAG_BYTES or "," in tag:
                raise InvalidSpec(f"{where}: virtio-fs tag {tag!r} must be 1-36 bytes, no ','")
        if len(set(tags)) != len(tags):
            raise InvalidSpec(f"{where}: virtio-fs tags must be unique, got {tags}")
        # Both VMMs parse these inside "key=value,key=value" options.
        in_options = [d.path for d in self.disks] + [self.serial_log, self.api_socket]
        in_options.append(self.events_file)
        for path in in_options + [s.socket for s in self.shares]:
            if "," in str(path):
                raise InvalidSpec(f"{where}: path {path} must not contain ','")
        for sock in [self.api_socket] + [s.socket for s in self.shares]:
            if len(str(sock).encode()) > MAX_SOCKET_PATH:
                raise InvalidSpec(
                    f"{where}: socket path {sock} is longer than {MAX_SOCKET_PATH} bytes"
                )


def kernel_cmdline(
    mode: BootMode, entrypoint: str = "", root_tag: str = ROOT_TAG, nonce: str = ""
) -> str:
    """The guest kernel command line for a virtio-fs root.

    Container mode passes the entrypoint through the seed, so only VM mode puts it on the
    command line: ``init=<argv0>``, and its arguments after ``--``, which the kernel hands
    to the initrd's /init as "$@" (a conforming initrd passes them on). One too long for
    the kernel's command line is refused naming spec.entrypoint (the kernel would cut it).
    Container mode carries ``nonce``: our init stamps its exit-code marker with it.
    """
    args = [*BASE_ARGS, f"root={root_tag}", "rootfstype=virtiofs", "rootdelay=30"]
    if mode is BootMode.CONTAINER and nonce:
        args.append(f"{NONCE_PARAM}={nonce}")
    if mode is BootMode.VM and entrypoint.strip():
        try:
            argv = shlex.split(entrypoint)
        except ValueError as exc:
            raise InvalidSpec(f"entrypoint {entrypoint!r} is not a valid command: {exc}") from exc
        for arg in argv:
            if '"' in arg or "\n" in arg:
                raise InvalidSpec(
                    f"entrypoint argument {arg!r}: '\"' and newlines cannot be passed "
                    "on a kernel command line"
                )
        args.append(f"init={_kernel_quote(argv[0])}")
        if len(argv) > 1:
            args += ["--", *(_kernel_quote(a) for a in argv[1:])]
    line = " ".join(args)
    if len(line.encode()) > MAX_CMDLINE:
        raise InvalidSpec(
            f"spec.entrypoint: {len(entrypoint.encode())} bytes make a kernel command line of "
            f"{len(line.encode())} bytes, over the kernel's {MAX_CMDLINE} in VM mode (the "
            "flist's own kernel gets it as init=); shorten it or put a script in the image"
        )
    return line


def _kernel_quote(arg: str) -> str:
    # The kernel's parser knows only double quotes around a whole word.
    return f'"{arg}"' if not arg or any(c.isspace() for c in arg) else arg


@dataclass(frozen=True)
class BootAssets:
    mode: BootMode
    kernel: Path
    initrd: Path | None


def detect_boot(root: Path, guest_dir: Path) -> BootAssets:
    """Choose the boot mode from the (mounted) flist root.

    ``/boot/vmlinuz`` (and optionally ``/boot/initrd.img``) in the root means VM mode with
    that kernel; otherwise container mode with ``guest_dir``'s vmlinuz + initramfs.img
    (hack/build-guest-kernel.sh). Symlinks are resolved inside ``root`` (an absolute link
    such as ``vmlinuz -> /boot/vmlinuz-6.1`` must not point into the host).
    """
    kernel = resolve_in_root(root, "/boot/vmlinuz")
    if kernel is not None and kernel.is_dir():
        raise InvalidSpec(f"{root}: /boot/vmlinuz is a directory")
    if kernel is not None and kernel.is_file():
        initrd = resolve_in_root(root, "/boot/initrd.img")
        if initrd is not None and initrd.is_dir():
            raise InvalidSpec(f"{root}: /boot/initrd.img is a directory")
        return BootAssets(BootMode.VM, kernel, initrd if initrd and initrd.is_file() else None)
    guest_kernel, guest_initrd = guest_dir / "vmlinuz", guest_dir / "initramfs.img"
    for path in (guest_kernel, guest_initrd):
        if not path.is_file():
            raise InvalidSpec(
                f"container-mode asset {path} missing (run hack/build-guest-kernel.sh)"
            )
    return BootAssets(BootMode.CONTAINER, guest_kernel, guest_initrd)


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> Path | None:
    """Host path of ``path`` as seen by a process chrooted at ``root``; None if it is missing.

    Every symlink is interpreted relative to ``root`` and ``..`` never climbs above it.
    """
    todo = list(PurePosixPath(path).parts[1:])
    parts: list[str] = []
    links = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        candidate = root.joinpath(*parts, comp)
        if candidate.is_symlink():
            links += 1
            if links > max_links:
                raise InvalidSpec(f"{root}: too many symlinks resolving {path}")
            target = PurePosixPath(candidate.readlink())
            if target.is_absolute():
                parts = []
            todo = [*target.parts[1 if target.is_absolute() else 0 :], *todo]
            continue
        if not candidate.exists():
            return None
        parts.append(comp)
    return root.joinpath(*parts)
