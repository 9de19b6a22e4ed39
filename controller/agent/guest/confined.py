"""File operations inside a guest's root filesystem, confined to it on the host.

A flist (or what a guest wrote into its writable layer) may hold symlinks anywhere:
``etc/ssh -> /etc/ssh`` would make a plain ``Path.glob`` + ``unlink`` under the mounted
root delete the host's own files. Every host-side operation on a path inside a guest root
goes through here: the directory is opened with openat2(2) ``RESOLVE_IN_ROOT``, so the
kernel resolves each symlink and ``..`` as if the root were ``/`` (no escape, no race with
a guest changing links in between), and the operation then works on that directory's fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.agent.errors import Unavailable

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def open_in_root(root: Path, path: str, flags: int) -> int:
    """An fd for ``path`` resolved with ``root`` as ``/``; raises OSError (ENOENT...)."""
    with _opened(root, os.O_PATH | os.O_DIRECTORY) as root_fd:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(
            _SYS_OPENAT2, root_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                raise Unavailable("openat2(2) is not available (Linux >= 5.6 needed)")
            raise OSError(err, os.strerror(err), f"{root}:{path}")
        return int(fd)


def remove_in_root(root: Path, directory: str, prefix: str) -> list[str]:
    """Delete the entries of ``directory`` (inside ``root``) whose names start with
    ``prefix``; symlinks among them are removed, never followed. Returns the names; a
    missing directory removes nothing."""
    try:
        dir_fd = open_in_root(root, directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    try:
        for name in sorted(os.listdir(dir_fd)):
            if name.startswith(prefix):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except IsADirectoryError:
                    continue  # a directory by that name is not a key file: leave it
                removed.append(name)
    finally:
        os.close(dir_fd)
    return removed


@contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
