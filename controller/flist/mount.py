"""Mounting an flist with FUSE: the foreground server and the helpers the agent calls."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pyfuse3
import structlog
import trio

from controller.flist import syscalls
from controller.flist.cache import BlockCache
from controller.flist.errors import FlistMountError
from controller.flist.fuse_ops import FlistOperations
from controller.flist.meta import open_flist
from controller.flist.stores import Router

log = structlog.get_logger(__name__)
FSNAME = "zmachine-flist"


def mount_command(
    flist: Path, mountpoint: Path, cache_dir: Path, stores: Sequence[str] = ()
) -> list[str]:
    """argv that serves ``flist`` at ``mountpoint`` in the foreground until unmounted/SIGTERM."""
    argv = [
        sys.executable,
        "-m",
        "controller.flist.cli",
        "mount",
        str(flist),
        str(mountpoint),
        "--cache",
        str(cache_dir),
    ]
    for store in stores:
        argv += ["--store", store]
    return argv


def is_mounted(path: Path) -> bool:
    return any_mounted([path])


def any_mounted(paths: Iterable[Path]) -> bool:
    """Whether any of ``paths`` is a mount point, from one read of the mount table."""
    return syscalls.any_mountpoint(os.path.abspath(p) for p in paths)


def wait_mounted(mountpoint: Path, timeout: float) -> None:
    """Block until ``mountpoint`` is a mount point; :class:`FlistMountError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if time.monotonic() >= deadline:
            raise FlistMountError(f"not mounted after {timeout:.1f}s", path=str(mountpoint))
        time.sleep(0.05)


async def wait_mounted_async(mountpoint: Path, alive: Callable[[], bool]) -> None:
    """:func:`wait_mounted` for an event loop (the caller bounds it), failing early once
    the server is gone. It holds no thread while it sleeps: a burst of mounts waiting in
    threads filled the default executor, and the agent's Lease heartbeat, queued behind
    them, expired. Each look reads the whole mount table (tens of ms with a few hundred
    mounts on a loaded machine): in a thread, not on the loop."""
    while not await asyncio.to_thread(is_mounted, mountpoint):
        if not alive():
            raise FlistMountError("the mount server exited before mounting", path=str(mountpoint))
        await asyncio.sleep(0.25)


def unmount(mountpoint: Path) -> None:
    """Detach the mount (lazily, so busy users do not block it); a no-op if not mounted."""
    while is_mounted(mountpoint):  # several mounts may be stacked on the same path
        try:
            syscalls.umount(os.path.abspath(mountpoint), syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise FlistMountError(f"umount failed: {exc.strerror}", path=str(mountpoint)) from None


async def _serve_until_signal() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("stopping on signal", signal=signum)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted from outside: the session ended


def serve(
    flist_path: Path, mountpoint: Path, cache_dir: Path | None, stores: Sequence[str] = ()
) -> None:
    """Mount and serve in the foreground; returns once unmounted or signalled."""
    if is_mounted(mountpoint):
        raise FlistMountError("already a mount point", flist=flist_path, path=str(mountpoint))
    if not mountpoint.is_dir():
        raise FlistMountError(
            "mount point is not a directory", flist=flist_path, path=str(mountpoint)
        )
    flist = open_flist(flist_path)
    specs = list(stores) or flist.store_specs()
    if not specs:
        raise FlistMountError("no store given and none recorded in the flist", flist=flist_path)
    cache = BlockCache(Router.from_specs(specs, flist.label), cache_dir, flist.label)
    ops = FlistOperations(flist, cache)
    options = set(pyfuse3.default_options) | {"ro", f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the hypervisor's virtiofsd and overlayfs users are others
    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as exc:
        raise FlistMountError(
            f"FUSE mount failed: {exc}", flist=flist_path, path=str(mountpoint)
        ) from None
    log.info("flist mounted", flist=str(flist_path), mountpoint=str(mountpoint), stores=len(specs))
    try:
        trio.run(_serve_until_signal)
    finally:
        pyfuse3.close(unmount=is_mounted(mountpoint))
        cache.close()
        flist.close()
        log.info("flist unmounted", flist=str(flist_path), mountpoint=str(mountpoint))
