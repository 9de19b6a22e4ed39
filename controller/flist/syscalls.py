"""mount(2)/umount2(2) through libc (no dependence on mount(8) being installed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
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


AT_SYMLINK_NOFOLLOW = 0x100
AT_STATX_DONT_SYNC = 0x4000  # a FUSE mount answers from its cache: no request to its server
STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256  # struct statx
_ATTRIBUTES = slice(8, 16)  # stx_attributes
_ATTRIBUTES_MASK = slice(56, 64)  # stx_attributes_mask
_STALE = (errno.ENOTCONN, errno.EIO)  # a FUSE mount whose server is gone


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` (absolute; a symlink is not followed) is the root of a mount in
    this mount namespace, from statx(2)'s STATX_ATTR_MOUNT_ROOT. Constant time, where the
    mount table grows by a few mounts per VM and reading it cost the kernel O(VMs) each
    time (the most expensive thing an agent did at 400 VMs). A dead FUSE mount still
    counts as mounted, as it does in the mount table."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC
    if _libc.statx(-100, path.encode(), flags, 0, buf):  # -100: AT_FDCWD
        code = ctypes.get_errno()
        if code in _STALE:
            return True
        if code in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise OSError(code, os.strerror(code), path)
    mask = int.from_bytes(buf.raw[_ATTRIBUTES_MASK], sys.byteorder)
    if not mask & STATX_ATTR_MOUNT_ROOT:
        raise OSError(errno.ENOSYS, "statx reports no STATX_ATTR_MOUNT_ROOT (Linux < 5.8)", path)
    return bool(int.from_bytes(buf.raw[_ATTRIBUTES], sys.byteorder) & STATX_ATTR_MOUNT_ROOT)


def any_mountpoint(paths: Iterable[str]) -> bool:
    """Whether any of ``paths`` (absolute, normalised) is a mount point."""
    return any(is_mountpoint(p) for p in paths)
