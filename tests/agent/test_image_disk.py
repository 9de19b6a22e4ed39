"""Image mode's disk rules without a VM: which disk boots, when a disk counts as blank, the copy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from controller.agent.errors import InvalidSpec
from controller.agent.guest.image import boot_disk, is_blank, write_image
from controller.agent.spec import MachineSpec, Mount, Volume, VolumeKind


def spec(volumes: list[Volume], mounts: list[Mount]) -> MachineSpec:
    return MachineSpec("file:///x.fl", 1, 256 << 20, volumes=tuple(volumes), mounts=tuple(mounts))


def test_the_first_disk_mount_is_the_boot_disk() -> None:
    vols = [
        Volume("a", VolumeKind.DISK, 1 << 20),
        Volume("s", VolumeKind.SHARE),
        Volume("b", VolumeKind.DISK, 1 << 20),
    ]
    # Mount order decides, not volume order; shares are skipped.
    assert boot_disk(spec(vols, [Mount("s", "/s"), Mount("b", "/b"), Mount("a", "/a")])) == 2
    with pytest.raises(InvalidSpec, match=r"needs spec\.mounts\[0\] to name a disk volume"):
        boot_disk(spec(vols, [Mount("s", "/s")]))  # disks exist, but none is mounted


def test_blank_means_no_signature_anywhere(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    assert is_blank(disk)  # not created yet
    disk.touch()
    os.truncate(disk, 32 << 20)
    assert is_blank(disk)
    # ext4 leaves its first 1024 bytes zero (the superblock is at 1 KiB): a "first
    # sectors are zero" test would take this formatted disk for blank and overwrite it.
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    assert disk.read_bytes()[:1024] == bytes(1024)
    assert not is_blank(disk)


def test_copy_is_sparse_and_refuses_a_too_small_disk(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    data = b"boot" * 1024 + bytes(4 << 20) + b"tail"
    image.write_bytes(data)
    disk = tmp_path / "d.img"
    write_image(image, disk, 16 << 20, "spec.volumes[0]")
    written = disk.read_bytes()
    assert written[: len(data)] == data and written[len(data) :] == bytes((16 << 20) - len(data))
    # Copied in 1 MiB chunks: the first and the last hold data, the zero ones stay holes.
    assert disk.stat().st_blocks * 512 < 2 << 20
    assert not (tmp_path / "d.image-copy").exists()
    with pytest.raises(InvalidSpec, match=r"spec.volumes\[0\]: the disk is 1048576 bytes, "):
        write_image(image, tmp_path / "small.img", 1 << 20, "spec.volumes[0]")
    assert not (tmp_path / "small.img").exists()


def test_copy_reports_its_progress_every_10_percent(tmp_path: Path) -> None:
    """What Get shows as "copying image N%" while an image-mode machine provisions."""
    image = tmp_path / "image.raw"
    image.write_bytes(b"x" * (20 << 20))  # 20 chunks of 1 MiB
    seen: list[int] = []
    write_image(image, tmp_path / "d.img", 32 << 20, "spec.volumes[0]", seen.append)
    assert seen == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
