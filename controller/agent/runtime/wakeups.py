"""Wake-ups without polling: a file's modifications (inotify) and a process's exit (pidfd).

The agent follows every running VM's VMM event file for as long as the VM runs. Reading
each file every 0.2 s cost a tenth of a core per hundred idle VMs (py-spy, docs/benchmarks.md
"Scale"); with these, an idle VM costs nothing until its VMM writes or exits.

One inotify descriptor serves every watch of an event loop; it is opened with the first
watch and closed with the last, so nothing outlives the VMs that needed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

IN_MODIFY = 0x002
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name: wd, mask, cookie, len


class _Inotify:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        fd = int(self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.loop = loop
        self.waiters: dict[int, set[asyncio.Event]] = {}
        loop.add_reader(fd, self._read)

    def add(self, path: Path, event: asyncio.Event) -> int:
        mask = IN_MODIFY | IN_DELETE_SELF | IN_MOVE_SELF
        wd = int(self.libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.waiters.setdefault(wd, set()).add(event)  # one inode watched twice: same wd
        return wd

    def remove(self, wd: int, event: asyncio.Event) -> None:
        waiters = self.waiters.get(wd)
        if waiters is None:
            return  # the kernel dropped the watch already (the file went away)
        waiters.discard(event)
        if not waiters:
            del self.waiters[wd]
            self.libc.inotify_rm_watch(self.fd, wd)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
            # wd -1: the kernel's queue overflowed and events were lost: wake everyone.
            for waiters in self.waiters.values() if wd == -1 else [self.waiters.get(wd, set())]:
                for event in waiters:
                    event.set()
            if mask & IN_IGNORED:
                self.waiters.pop(wd, None)


_inotify: dict[asyncio.AbstractEventLoop, _Inotify] = {}


@contextlib.contextmanager
def _file(path: Path, event: asyncio.Event) -> Iterator[bool]:
    loop = asyncio.get_running_loop()
    notify = _inotify.get(loop)
    if notify is None:
        notify = _inotify[loop] = _Inotify(loop)
    try:
        wd = notify.add(path, event)
    except OSError as exc:
        log.debug("not watching a file", path=str(path), error=str(exc))
        wd = None
    try:
        yield wd is not None
    finally:
        if wd is not None:
            notify.remove(wd, event)
        if not notify.waiters and _inotify.get(loop) is notify:
            del _inotify[loop]
            notify.close()


@contextlib.contextmanager
def _exit(pid: int, event: asyncio.Event) -> Iterator[bool]:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        event.set()  # gone already
        yield True
        return
    except OSError as exc:
        log.debug("not watching a process", pid=pid, error=str(exc))
        yield False
        return
    loop = asyncio.get_running_loop()

    def exited() -> None:  # a pidfd turns readable, and stays so, once its process exits
        loop.remove_reader(fd)
        event.set()

    loop.add_reader(fd, exited)
    try:
        yield True
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@contextlib.contextmanager
def changes(path: Path, pid: int) -> Iterator[tuple[asyncio.Event, bool]]:
    """An event set whenever ``path`` is modified and when process ``pid`` exits, and
    whether both are watched (False: the caller must poll, e.g. when the file is missing
    or the inotify watch limit is reached)."""
    event = asyncio.Event()
    with _file(path, event) as file_ok, _exit(pid, event) as exit_ok:
        yield event, file_ok and exit_ok
