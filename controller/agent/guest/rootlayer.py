"""The quota of a Zmachine's writable root: a sparse ext4 image, loop-mounted.

zos puts the overlay's upper layer on a btrfs subvolume with a quota of RootSize(). The
agent gets the same limit from a filesystem of exactly that size: a sparse file formatted
ext4 (no journal: the guest's writes already go through the host page cache and virtiofsd,
and it keeps the image small), mounted through a loop device that goes away with the last
unmount (autoclear). The overlay's upper and work dirs live inside it, so a
guest that fills it gets ENOSPC. Growing is done offline (truncate, e2fsck, resize2fs):
online resizing needs EXT4_IOC_RESIZE_FS, which container runtimes commonly deny.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from controller.agent.errors import Unavailable
from controller.agent.guest import loopdev
from controller.flist import syscalls

TIMEOUT = 600.0  # e2fsck/resize2fs of a large, full image take a while
log = structlog.get_logger(__name__)

UNMOUNT_WAIT = 5.0  # a lazily detached overlay on top may take a moment to let go


def _run(argv: Sequence[str], ok: Sequence[int] = (0,)) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if out.returncode not in ok:
        raise Unavailable(
            f"{argv[0]} failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}"
        )
    return out.stdout


def create(image: Path, size: int) -> None:
    """A new sparse image of ``size`` bytes; made under a temporary name so an interrupted
    mkfs never leaves a half-formatted image that later looks like the VM's root."""
    tmp = image.with_suffix(".new")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    os.truncate(tmp, size)
    # -m 0: no blocks reserved for root, so every guest user gets the whole size.
    _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-L", "zmroot", str(tmp)])
    _loop_note(image).write_text("")  # never attached: no loop device to look for
    tmp.rename(image)


def fs_size(image: Path) -> int:
    """The filesystem's size in bytes, from its superblock (the file may be larger when a
    grow was interrupted between truncate and resize2fs)."""
    fields: dict[str, str] = {}
    for line in _run(["dumpe2fs", "-h", str(image)]).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError) as exc:
        raise Unavailable(f"{image}: not an ext4 image (dumpe2fs: no {exc})") from None


def grow(image: Path, size: int) -> None:
    """Grow the unmounted image's file and filesystem to ``size`` bytes. Refused while a
    loop device is still attached (another mount namespace kept a copy of the mount, see
    ``unmount``): resizing under a mounted filesystem corrupts it, and the next mount would
    reuse that device at its old size. The caller's retry finds it released."""
    attached = attached_loop(image)
    if attached:
        raise Unavailable(
            f"{image}: cannot grow it while it is still mounted in another mount namespace "
            f"(through {attached}); retried once that namespace lets it go"
        )
    if image.stat().st_size < size:
        os.truncate(image, size)
    # resize2fs refuses a filesystem not checked since its last mount; 1 = errors fixed.
    _run(["e2fsck", "-f", "-p", str(image)], ok=(0, 1))
    _run(["resize2fs", str(image)])


def loop_devices(image: Path) -> list[str]:
    """Every loop device backed by ``image`` (``losetup -j``). It walks every loop device
    on the host: for images from before the loop notes, and for tests."""
    out = _run(["losetup", "-j", str(image)])
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _loop_note(image: Path) -> Path:
    """Beside the image: the loop device it was last attached to (empty: never)."""
    return image.with_name(image.name + ".loop")


def attached_loop(image: Path) -> str | None:
    """The loop device still backed by ``image``, from its note, checked in sysfs: looking
    at every loop device instead (``mount -o loop``, ``losetup -j``) costs O(devices) per
    call, and at 700 VMs the agents' mounts spent most of the host's CPU doing just that.
    Without a note (an image attached by an older agent), every device is looked at."""
    try:
        name = _loop_note(image).read_text().strip()
    except FileNotFoundError:
        found = loop_devices(image)
        return found[0] if found else None
    if not name:
        return None
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None  # detached
    return f"/dev/{name}" if backing == os.path.realpath(image) else None


def mount(image: Path, target: Path) -> None:
    """Mount ``image`` at ``target``. A loop device still attached to it (an unmount the
    kernel has not finished, or a copy of the mount in another mount namespace) is reused:
    a second device on the same file would be a second ext4 instance writing the same
    blocks."""
    target.mkdir(mode=0o700, exist_ok=True)
    device = attached_loop(image)
    if device is not None:
        _mount_ext4(device, target)
        return
    with loopdev.attach(image, autoclear=True) as device:
        _loop_note(image).write_text(device.removeprefix("/dev/"))
        # The device goes with our last reference: this one if the mount fails, else the
        # filesystem's at its unmount.
        _mount_ext4(device, target)


def _mount_ext4(device: str, target: Path) -> None:
    try:
        syscalls.mount(device, str(target), "ext4", syscalls.MS_NOATIME, "")
    except OSError as exc:
        raise Unavailable(f"mounting {device} on {target} failed: {exc.strerror}") from None


def unmount(image: Path, target: Path) -> None:
    """Unmount ``target`` (not lazily: a lazy unmount would keep the loop device and the
    deleted image alive) and detach any loop device left on ``image``."""
    text = os.path.abspath(target)
    deadline = time.monotonic() + UNMOUNT_WAIT
    while syscalls.any_mountpoint([text]):
        try:
            syscalls.umount(text)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                break
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise Unavailable(f"{target}: unmount failed: {exc.strerror}") from None
            time.sleep(0.1)
    # The kernel detaches an autoclear device asynchronously after the unmount; detach
    # leftovers ourselves (a detach is harmless on one already going away) and wait
    # until none is left, so a deleted image never stays alive behind a loop device.
    while image.exists() and (attached := attached_loop(image)):
        if time.monotonic() >= deadline:
            holders = foreign_holders(text)
            if holders:
                # A mount namespace made while the image was mounted (a container runtime,
                # a build tool) holds its own copy of the mount; our unmount cannot reach it.
                # The autoclear device goes when that namespace ends; the image file we
                # delete next is then freed, and a new Deploy formats a new file.
                log.warning(
                    "root image still held by another mount namespace",
                    image=str(image),
                    loop=attached,
                    holders=holders[:5],
                )
                return
            raise Unavailable(f"{image}: loop device {attached} still attached")
        loopdev.detach(attached)
        time.sleep(0.1)


def foreign_holders(mountpoint: str) -> list[int]:
    """Pids in other mount namespaces whose mount table still lists ``mountpoint``."""
    ours = os.readlink("/proc/self/ns/mnt")
    needle = f" {mountpoint} "
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "ns" / "mnt") != ours and needle in (
                proc / "mountinfo"
            ).read_text(errors="surrogateescape"):
                pids.append(int(proc.name))
        except OSError:
            continue  # gone, or a kernel thread
    return pids


def adopt_plain_upper(old_upper: Path, old_work: Path, upper: Path) -> None:
    """Agents before the root image kept the overlay's upper and work dirs as plain
    directories in the VM dir: copy the upper layer into the mounted image (``cp -a`` keeps
    overlayfs's whiteouts, 0:0 character devices, and its trusted.overlay.* xattrs), then
    drop the old dirs (work holds nothing once the overlay is unmounted). A layer that does
    not fit fails with ENOSPC and is kept as it was, for a retry with a larger spec.size."""
    tmp = upper.with_name(upper.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted earlier copy
    try:
        _run(["cp", "-a", str(old_upper), str(tmp)])
    except Unavailable:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back to the guest
        raise
    tmp.rename(upper)
    shutil.rmtree(old_upper)
    shutil.rmtree(old_work, ignore_errors=True)
