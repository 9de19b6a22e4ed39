"""The writable root's size without a VM: zos's MinRootSize()/RootSize() rule, the agent's
validation of spec.size, and the loop-mounted ext4 image that enforces it (real mkfs,
loop device, ENOSPC, offline grow, unmount leaving no loop device)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from controller.agent.errors import InvalidSpec, Unavailable
from controller.agent.guest import rootlayer
from controller.agent.spec import (
    GIB,
    MIB,
    MachineSpec,
    Ref,
    human_size,
    min_root_size,
    root_size,
    validate_spec,
)
from tests.agent.agent_harness import loop_backing_files

REF = Ref("default", "vm", "u-root-size")


@pytest.mark.parametrize(
    ("cpu", "memory", "minimum"),
    [
        (1, 4 * GIB, 500 * MIB),  # zos's own examples (reference 1.3)
        (2, 4 * GIB, 2 * GIB),
        (1, 8 * GIB, 2 * GIB),  # cpu x memory = 8 GiB exactly: the 2 GiB side
        (1, 8 * GIB - 1, 500 * MIB),  # integer maths: just below rounds down to 0
        (4, 256 * MIB, 500 * MIB),
    ],
)
def test_min_root_size_follows_zos(cpu: int, memory: int, minimum: int) -> None:
    assert min_root_size(cpu, memory) == minimum


def test_root_size_is_the_larger_of_size_and_minimum() -> None:
    assert root_size(MachineSpec("file:///x.fl", 1, 4 * GIB)) == 500 * MIB  # 0 = minimum
    assert root_size(MachineSpec("file:///x.fl", 2, 4 * GIB, size_bytes=3 * GIB)) == 3 * GIB


def test_a_size_below_the_minimum_is_refused_naming_spec_size() -> None:
    validate_spec(REF, MachineSpec("file:///x.fl", 1, 4 * GIB, size_bytes=500 * MIB))
    validate_spec(REF, MachineSpec("file:///x.fl", 1, 4 * GIB, size_bytes=0))
    too_small = MachineSpec("file:///x.fl", 2, 4 * GIB, size_bytes=1 * GIB)
    with pytest.raises(InvalidSpec, match=r"spec\.size 1Gi is below the minimum root size 2Gi"):
        validate_spec(REF, too_small)


def test_human_size() -> None:
    assert [human_size(n) for n in (2 * GIB, 500 * MIB, 1536 * MIB, 1000)] == [
        "2Gi",
        "500Mi",
        "1536Mi",
        "1000",
    ]


@pytest.mark.fuse  # root: loop devices and mount
def test_the_image_is_a_quota_that_grows_and_unmounts_cleanly(tmp_path: Path) -> None:
    image, layer = tmp_path / "rootfs.ext4", tmp_path / "layer"
    rootlayer.create(image, 64 * MIB)
    assert image.stat().st_size == 64 * MIB
    assert image.stat().st_blocks * 512 < 8 * MIB, "the image must be sparse"
    assert rootlayer.fs_size(image) == 64 * MIB
    assert rootlayer.attached_loop(image) is None  # new: nothing to look for
    rootlayer.mount(image, layer)
    try:
        [device] = rootlayer.loop_devices(image)  # every device looked at, as losetup does
        assert rootlayer.attached_loop(image) == device  # the one its note names
        big = layer / "big"
        with open(big, "wb") as f, pytest.raises(OSError) as err:
            os.posix_fallocate(f.fileno(), 0, 70 * MIB)
        assert err.value.errno == errno.ENOSPC
        big.unlink()
        (layer / "kept").write_text("survives the grow\n")
    finally:
        rootlayer.unmount(image, layer)
    assert rootlayer.loop_devices(image) == []
    rootlayer.grow(image, 96 * MIB)
    assert image.stat().st_size == rootlayer.fs_size(image) == 96 * MIB
    rootlayer.mount(image, layer)
    try:
        assert (layer / "kept").read_text() == "survives the grow\n"
        with open(layer / "big", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 70 * MIB)  # fits now
    finally:
        rootlayer.unmount(image, layer)
    assert str(image) not in loop_backing_files()
    assert str(layer) not in Path("/proc/mounts").read_text()
    assert rootlayer.attached_loop(image) is None


@pytest.mark.fuse  # root: loop devices and mount
def test_an_image_attached_by_an_older_agent_is_found_and_reused(tmp_path: Path) -> None:
    """An image without a note (attached by ``mount -o loop`` before the notes): every
    device is looked at, and the one found is reused, never a second on the same file."""
    image, layer = tmp_path / "rootfs.ext4", tmp_path / "layer"
    rootlayer.create(image, 16 * MIB)
    (tmp_path / "rootfs.ext4.loop").unlink()
    held = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        assert rootlayer.attached_loop(image) == held
        rootlayer.mount(image, layer)
        assert rootlayer.loop_devices(image) == [held]
        rootlayer.unmount(image, layer)
    finally:
        subprocess.run(["losetup", "-d", held], check=False)
    assert rootlayer.loop_devices(image) == []


@pytest.mark.fuse  # root: loop devices, mknod, trusted.* xattrs
def test_a_plain_upper_dir_from_an_older_agent_moves_into_the_image(tmp_path: Path) -> None:
    old_upper, old_work = tmp_path / "upper", tmp_path / "work"
    (old_upper / "etc").mkdir(parents=True)
    (old_work / "work").mkdir(parents=True)
    (old_upper / "etc/hostname").write_text("kept\n")
    os.mknod(old_upper / "etc/deleted", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    os.setxattr(old_upper / "etc", "trusted.overlay.opaque", b"y")
    image, layer = tmp_path / "rootfs.ext4", tmp_path / "layer"
    rootlayer.create(image, 16 * MIB)
    rootlayer.mount(image, layer)
    try:
        rootlayer.adopt_plain_upper(old_upper, old_work, layer / "upper")
        upper = layer / "upper"
        assert (upper / "etc/hostname").read_text() == "kept\n"
        whiteout = (upper / "etc/deleted").lstat()
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
        assert os.getxattr(upper / "etc", "trusted.overlay.opaque") == b"y"
        assert not old_upper.exists() and not old_work.exists()
        # Too big for the image: ENOSPC, and the old layer stays for a retry.
        (tmp_path / "upper").mkdir()
        (tmp_path / "upper/big").write_bytes(os.urandom(20 * MIB))
        with pytest.raises(Unavailable, match="No space left"):
            rootlayer.adopt_plain_upper(old_upper, old_work, layer / "upper2")
        assert (old_upper / "big").exists() and not (layer / "upper2.new").exists()
    finally:
        rootlayer.unmount(image, layer)


@pytest.mark.fuse  # root: loop devices, mount and unshare
def test_a_copy_of_the_mount_in_another_namespace_does_not_block_the_unmount(
    tmp_path: Path,
) -> None:
    """A mount namespace made while the image is mounted (a build tool, a container
    runtime) holds its own copy; the agent's unmount still succeeds, and the loop device
    goes with that namespace. Growing is refused while the copy is mounted (resize2fs
    under a mounted filesystem would corrupt it, and a remount would reuse the held
    device at its old size), and works once it is gone."""
    image, layer = tmp_path / "rootfs.ext4", tmp_path / "layer"
    rootlayer.create(image, 16 * MIB)
    rootlayer.mount(image, layer)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while holder.pid not in rootlayer.foreign_holders(str(layer)):
            assert time.monotonic() < deadline, "the copy never appeared"
            time.sleep(0.05)
        rootlayer.unmount(image, layer)
        assert str(layer) not in Path("/proc/self/mountinfo").read_text()
        assert rootlayer.loop_devices(image), "the other namespace still holds the device"
        with pytest.raises(Unavailable, match="mounted in another mount namespace"):
            rootlayer.grow(image, 32 * MIB)
        assert image.stat().st_size == 16 * MIB and rootlayer.fs_size(image) == 16 * MIB
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while rootlayer.loop_devices(image):
        assert time.monotonic() < deadline, "the autoclear device outlived its last mount"
        time.sleep(0.1)
    rootlayer.grow(image, 32 * MIB)
    assert rootlayer.fs_size(image) == 32 * MIB
