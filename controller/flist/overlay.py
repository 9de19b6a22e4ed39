"""A writable Zmachine root: overlayfs over the read-only flist mount (as zos does).

Upper and work dir are per Zmachine and must share a filesystem. ``redirect_dir``, ``metacopy``
and ``index`` are off so the FUSE lower layer never needs xattr or file-handle support.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from controller.flist import syscalls
from controller.flist.errors import OverlayError

_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"


def _check(path: Path) -> str:
    text = os.path.abspath(path)
    if any(c in text for c in ",:\\\n"):
        raise OverlayError("overlay paths must not contain ',', ':', '\\' or newlines", path=text)
    return text


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """Mount ``lower`` (read-only) + ``upper``/``work`` (created if missing) at ``target``."""
    for path in (upper, work, target):
        path.mkdir(parents=True, exist_ok=True)
    if not lower.is_dir():
        raise OverlayError("lower layer is not a directory", path=str(lower))
    if upper.stat().st_dev != work.stat().st_dev:
        raise OverlayError("upper and work dir are on different filesystems", path=str(work))
    options = f"lowerdir={_check(lower)},upperdir={_check(upper)},workdir={_check(work)},{_OPTIONS}"
    try:
        syscalls.mount("overlay", _check(target), "overlay", syscalls.MS_NOATIME, options)
    except OSError as exc:
        raise OverlayError(f"overlay mount failed: {exc.strerror}", path=str(target)) from None


def unmount_overlay(target: Path) -> None:
    """Unmount the overlay at ``target``; a no-op if nothing is mounted there."""
    text = os.path.abspath(target)
    while syscalls.any_mountpoint([text]):
        try:
            syscalls.umount(text, syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise OverlayError(f"overlay unmount failed: {exc.strerror}", path=text) from None
