"""Image mode (zos "full VM"): the flist's ``/image.raw`` is a whole disk with its own loader.

zos copies it byte for byte onto the first mount's disk (``mounts[0]``) only if that disk is
blank, so re-deploys and restarts keep whatever the guest wrote, and boots the disk with a
firmware instead of a kernel. Same rules here: ``boot_disk`` picks the disk, ``is_blank``
decides, ``write_image`` copies (sparse, atomically, with progress in the log).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from controller.agent.errors import InvalidSpec, Unavailable
from controller.agent.spec import MachineSpec, VolumeKind

log = structlog.get_logger(__name__)

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)
PROGRESS_STEP = 10  # percent between progress lines in the log


def boot_disk(spec: MachineSpec) -> int:
    """Index in ``spec.volumes`` of the boot disk: the first mount (in mount order, as zos
    takes ``mounts[0]``) whose volume is a disk."""
    for m in spec.mounts:
        for i, v in enumerate(spec.volumes):
            if v.name == m.name and v.kind is VolumeKind.DISK:
                return i
    raise InvalidSpec(
        "spec.flist is a disk image (/image.raw): image mode needs spec.mounts[0] to name "
        "a disk volume (the first disk mount is the boot disk the image is copied onto), "
        "and spec.mounts names none"
    )


def is_blank(disk: Path) -> bool:
    """No filesystem and no partition table on ``disk`` (a missing file is blank).

    ``blkid -p`` (what zos's storaged.DiskWrite asks) rather than "the first sectors are
    zero": it probes every signature it knows wherever it lives (btrfs's superblock at
    64 KiB, GPT's backup header, md 1.0 and ZFS labels at the end), so a formatted disk
    whose first sectors happen to be zero is never taken for blank and overwritten.
    ``-p`` reads the file itself, no cache and no loop device. Its limit, as in zos: raw
    data without any signature counts as blank.
    """
    if not disk.exists():
        return True
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", str(disk)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode == 2:  # nothing found
        return True
    if out.returncode in (0, 8):  # found; 8: several signatures (ambivalent), still not blank
        return False
    raise Unavailable(f"blkid -p {disk} failed ({out.returncode}): {out.stderr.strip()}")


def write_image(
    image: Path,
    disk: Path,
    disk_bytes: int,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy ``image`` onto a blank ``disk`` of ``disk_bytes``; ``what`` names the disk's
    spec field for errors; ``progress`` is called with the percent copied, every 10 %
    (from this thread: it must only record it).

    Written to a temporary file that replaces the disk only when complete: a copy cut
    short (agent crash) leaves the disk blank, so the next attempt copies again instead
    of booting half an image. All-zero chunks are skipped, keeping the disk sparse.
    """
    size = image.stat().st_size
    if size > disk_bytes:
        raise InvalidSpec(
            f"{what}: the disk is {disk_bytes} bytes, smaller than the flist's /image.raw "
            f"({size} bytes)"
        )
    lg = log.bind(image=str(image), disk=str(disk), total_bytes=size)
    lg.info("copying disk image")
    started = time.monotonic()
    tmp = disk.with_suffix(".image-copy")
    try:
        with open(image, "rb") as src, open(tmp, "wb") as dst:
            dst.truncate(disk_bytes)
            _copy_sparse(src.fileno(), dst.fileno(), size, lg, progress)
            os.fsync(dst.fileno())
        tmp.rename(disk)
    finally:
        tmp.unlink(missing_ok=True)
    lg.info("disk image copied", seconds=round(time.monotonic() - started, 1))


def _copy_sparse(
    src: int,
    dst: int,
    size: int,
    lg: structlog.stdlib.BoundLogger,
    progress: Callable[[int], None] | None,
) -> None:
    copied, reported = 0, 0
    while chunk := os.read(src, CHUNK):
        if chunk == _ZEROS[: len(chunk)]:
            os.lseek(dst, len(chunk), os.SEEK_CUR)  # a hole: the disk file is sparse
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
        copied += len(chunk)
        percent = copied * 100 // size
        if percent >= reported + PROGRESS_STEP:
            reported = percent - percent % PROGRESS_STEP
            lg.info("disk image copy progress", percent=reported, copied_bytes=copied)
            if progress is not None:
                progress(reported)
    if copied != size:
        raise Unavailable(f"/image.raw: read {copied} of {size} bytes")
