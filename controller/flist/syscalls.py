"""mount(2)/umount2(2) through libc (no dependence on mount(8) being installed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Iterable

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


def _escaped(path: str) -> str:
    """``path`` as /proc/self/mountinfo writes it (octal escapes)."""
    return (
        path.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


def any_mountpoint(paths: Iterable[str]) -> bool:
    """Whether any of ``paths`` (absolute, normalised) is a mount point of this mount
    namespace: one read of /proc/self/mountinfo, matched against its fifth field by one
    regular expression. The table grows by a few mounts per VM; splitting it line by line
    in Python made each look cost O(VMs) of interpreted work, several times per deploy."""
    alternatives = "|".join(re.escape(_escaped(p)) for p in paths)
    if not alternatives:
        return False
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        text = handle.read()
    return re.search(f"^(?:\\S+ ){{4}}(?:{alternatives}) ", text, re.MULTILINE) is not None
