"""mount(2)/umount2(2) through libc (no dependence on mount(8) being installed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_RDONLY = 1
MS_NOATIME = 1024
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int, options: str) -> None:
    """Raise OSError (with errno) when the kernel refuses."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode()):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def mountpoints() -> set[str]:
    """Mount points of this mount namespace (from /proc/self/mountinfo, octal escapes decoded)."""
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            field = line.split(" ")[4]
            points.add(
                field.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
            )
    return points
