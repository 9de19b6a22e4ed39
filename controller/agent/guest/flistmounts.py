"""One read-only FUSE mount per distinct flist on a node, shared by the VMs booted from it.

A mount server is a Python process (about 0.5 s of CPU to start and tens of MiB resident):
one per VM made it the largest cost of a burst of creations and of an idle VM's host
memory. The flist is read-only and each VM writes to its own overlay upper layer, so one
mount serves them all.

Who uses a mount is known from the machine records (``MachineRecord.flist_mount``), which
are on disk: after an agent restart, ``adopt`` counts the records again and ``sweep``
unmounts what no record names, so a crash between mounting and saving leaks nothing. The
server's ProcessRef is kept next to the mount point, to tell a live server from a dead one
(a dead one leaves a mount that answers ENOTCONN) and to stop it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections import defaultdict
from pathlib import Path

import structlog

from controller.agent.runtime.procs import ProcessRef, spawn_detached, terminate
from controller.flist import mount
from controller.flist.errors import FlistMountError

log = structlog.get_logger(__name__)

# A server that died is seen at once; one alive but not mounted yet is still starting
# (a burst of VMs on a loaded machine starts several, each importing its Python).
MOUNT_TIMEOUT = 120.0


class FlistMounts:
    def __init__(self, state_dir: Path, cache_dir: Path) -> None:
        self.root = state_dir / "flists"
        self.cache_dir = cache_dir
        self._users: defaultdict[str, set[str]] = defaultdict(set)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @staticmethod
    def key(flist: Path) -> str:
        """The fetched flist's name is its content digest: equal flists share a mount."""
        return flist.name.split(".", 1)[0]

    def path(self, key: str) -> Path:
        return self.root / key / "mnt"

    def _ref_file(self, key: str) -> Path:
        return self.root / key / "server.json"

    def _server(self, key: str) -> ProcessRef | None:
        try:
            return ProcessRef(**json.loads(self._ref_file(key).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def adopt(self, uid: str, key: str) -> None:
        """After a restart: ``uid``'s record names this mount."""
        self._users[key].add(uid)

    async def acquire(self, uid: str, flist: Path) -> Path:
        """The mount of ``flist`` for ``uid``, started if none serves it."""
        key = self.key(flist)
        async with self._locks[key]:
            point = self.path(key)
            server = self._server(key)
            mounted = await asyncio.to_thread(mount.is_mounted, point)
            if not (mounted and server is not None and server.alive()):
                await self._stop(key, server)  # whatever a crash left: stale mount, server
                point.mkdir(parents=True, exist_ok=True, mode=0o700)
                argv = mount.mount_command(flist, point, self.cache_dir)
                server = spawn_detached(argv, point.parent / "mount.log", str(point))
                self._ref_file(key).write_text(json.dumps(dataclasses.asdict(server)))
                try:
                    async with asyncio.timeout(MOUNT_TIMEOUT):
                        await mount.wait_mounted_async(point, server.alive)
                except TimeoutError:
                    await self._stop(key, server)
                    raise FlistMountError(
                        f"not mounted after {MOUNT_TIMEOUT:.0f}s", path=str(point)
                    ) from None
                except FlistMountError:
                    await self._stop(key, server)
                    raise
                log.info("flist mounted", flist=str(flist), mountpoint=str(point))
            self._users[key].add(uid)
            return point

    async def release(self, uid: str, key: str) -> None:
        """``uid`` no longer uses the mount (its overlay is gone); the last user ends it."""
        async with self._locks[key]:
            users = self._users[key]
            users.discard(uid)
            if not users:
                await self._stop(key, self._server(key))
                self._users.pop(key, None)

    async def sweep(self) -> None:
        """After adoption: end every mount no record names (a crash left it)."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            async with self._locks[d.name]:
                if not self._users.get(d.name):
                    await self._stop(d.name, self._server(d.name))

    async def _stop(self, key: str, server: ProcessRef | None) -> None:
        point = self.path(key)
        await asyncio.to_thread(mount.unmount, point)  # a no-op if not mounted
        if server is not None:
            await terminate(server)  # it ends by itself once unmounted; this waits for it
        if self.root.joinpath(key).exists():
            await asyncio.to_thread(shutil.rmtree, self.root / key)
