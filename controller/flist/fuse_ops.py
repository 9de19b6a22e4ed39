"""pyfuse3 operations serving an open flist read-only (inode = the flist's ``ino``)."""

from __future__ import annotations

import errno
import functools
import itertools
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import structlog
import trio

from controller.flist.cache import BlockCache
from controller.flist.chunks import BlockRef
from controller.flist.errors import FlistError, FlistNotFoundError
from controller.flist.meta import Entry, Flist

log = structlog.get_logger(__name__)
TTL = 86400.0  # an flist never changes while mounted
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

P = ParamSpec("P")
T = TypeVar("T")


def _guarded(
    method: Callable[Concatenate[FlistOperations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[FlistOperations, P], Coroutine[Any, Any, T]]:
    """Answer every request with an errno: pyfuse3 lets any other exception end the mount."""

    @functools.wraps(method)
    async def wrapper(self: FlistOperations, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FlistNotFoundError as exc:
            raise self.fail(exc, errno.ENOENT) from None
        except FlistError as exc:
            raise self.fail(exc, errno.EIO) from None
        except Exception:
            self.log.exception("internal error", op=method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(frozen=True)
class _OpenFile:
    entry: Entry
    refs: list[BlockRef]
    path: str


class FlistOperations(pyfuse3.Operations):
    def __init__(self, flist: Flist, cache: BlockCache) -> None:
        super().__init__()
        self.flist = flist
        self.cache = cache
        self._root_db = flist.root.ino
        self._handles = itertools.count(1)
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[Entry]] = {}
        self._statfs: tuple[int, int] | None = None
        self.log = log.bind(flist=flist.label)

    # FUSE needs the root at inode 1; swap it with whatever the flist numbered 1 (if anything).
    def _to_db(self, inode: int) -> int:
        if inode == pyfuse3.ROOT_INODE:
            return self._root_db
        return pyfuse3.ROOT_INODE if inode == self._root_db else inode

    def _to_fuse(self, ino: int) -> int:
        return self._to_db(ino)  # the swap is its own inverse

    def fail(self, exc: FlistError, code: int) -> pyfuse3.FUSEError:
        self.log.warning("request failed", error=str(exc), errno=errno.errorcode.get(code))
        return pyfuse3.FUSEError(code)

    def _attrs(self, entry: Entry) -> pyfuse3.EntryAttributes:
        primary = self.flist.hardlinks.get(entry.ino)
        if primary is not None:
            entry = self.flist.get(primary)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._to_fuse(entry.ino)
        attrs.generation = 0
        attrs.entry_timeout = TTL
        attrs.attr_timeout = TTL
        attrs.st_mode = entry.mode
        attrs.st_nlink = 2 if entry.is_dir else self.flist.link_counts.get(entry.ino, 1)
        attrs.st_uid = entry.uid
        attrs.st_gid = entry.gid
        attrs.st_rdev = entry.rdev
        attrs.st_size = entry.size
        attrs.st_blksize = 4096
        attrs.st_blocks = -(-entry.size // 512)
        attrs.st_atime_ns = attrs.st_mtime_ns = entry.mtime * 1_000_000_000
        attrs.st_ctime_ns = entry.ctime * 1_000_000_000
        return attrs

    def _get(self, inode: int) -> Entry:
        return self.flist.get(self._to_db(inode))  # FlistNotFoundError -> ENOENT

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._get(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            found: Entry | None = parent
        elif name == b"..":
            found = self.flist.root if parent.parent == 0 else self.flist.get(parent.parent)
        else:
            try:
                text = name.decode()
            except UnicodeDecodeError:  # flist names are UTF-8: this one cannot exist
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            found = self.flist.lookup(parent.ino, text)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(found)

    async def forget(self, inode_list: object) -> None:
        pass  # nothing is kept per inode

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._get(inode))

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self._get(inode)
        if not entry.is_link or entry.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = self._get(inode)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        handle = next(self._handles)
        self._dirs[handle] = self.flist.children(entry.ino)
        return handle

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._dirs[fh]
        for index in range(start_id, len(children)):
            child = children[index]
            if not pyfuse3.readdir_reply(token, child.name.encode(), self._attrs(child), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self._get(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not entry.is_file:
            raise pyfuse3.FUSEError(errno.EACCES)
        refs = self.flist.blocks(entry)  # size/blocks mismatch -> EIO here, not mid-read
        handle = next(self._handles)
        self._files[handle] = _OpenFile(entry, refs, self.flist.path_of(entry.ino))
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        cached = self.cache.read_from_memory(handle.refs, handle.entry.size, off, size)
        if cached is not None:
            return cached
        return await trio.to_thread.run_sync(
            self.cache.read, handle.refs, handle.entry.size, off, size, handle.path
        )

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        if self._statfs is None:
            self._statfs = (-(-self.flist.total_size() // 4096), self.flist.count())
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks, data.f_files = self._statfs
        data.f_bfree = data.f_bavail = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._get(inode)
        raise pyfuse3.FUSEError(errno.ENODATA)  # flists carry no xattrs

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._get(inode)
        return []

    @_guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._get(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True  # permission bits are checked by the kernel (default_permissions)
