"""``pack``: a directory tree -> an rfs v2 ``.fl`` plus its blocks in the given stores."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from controller.flist import chunks
from controller.flist.chunks import CHUNK_SIZE, BlockRef
from controller.flist.errors import FlistError, StoreError
from controller.flist.schema import HARDLINK_TABLE, INODE_INSERT, create_schema
from controller.flist.stores import Router, parse_spec, strip_password

log = structlog.get_logger(__name__)
_PENDING_CHUNKS = 16  # chunks in flight: bounds memory at ~8 MiB while keeping both cores busy


@dataclass
class PackStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    hardlinks: int = 0
    bytes: int = 0
    blocks: int = 0
    blocks_written: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def _seconds(ns: int) -> int:
    return ns // 1_000_000_000  # floor, also for times before 1970


def _db_name(name: str) -> str:
    # rfs stores names as lossy UTF-8; undecodable bytes become U+FFFD the same way.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _encode_and_store(router: Router, plain: bytes) -> tuple[BlockRef, int]:
    ref, stored = chunks.encode_v2(plain)
    return ref, router.put(ref.id, stored)


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Packer:
    def __init__(self, conn: sqlite3.Connection, router: Router, progress: bool) -> None:
        self.conn = conn
        self.router = router
        self.progress = progress
        self.stats = PackStats()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flist-pack")
        self.pending: deque[tuple[int, Future[tuple[BlockRef, int]]]] = deque()
        self.links: dict[tuple[int, int], int] = {}
        self.last_report = self.stats.started  # first line after 0.5 s: short packs stay quiet

    def insert(self, parent: int, name: str, st: os.stat_result, size: int) -> int:
        return self.insert_row(
            parent,
            name,
            size,
            (st.st_uid, st.st_gid, st.st_mode, st.st_rdev),
            (_seconds(st.st_ctime_ns), _seconds(st.st_mtime_ns)),
        )

    def insert_row(
        self,
        parent: int,
        name: str,
        size: int,
        owner_mode_rdev: tuple[int, int, int, int],
        ctime_mtime: tuple[int, int],
    ) -> int:
        cursor = self.conn.execute(
            INODE_INSERT, (parent, _db_name(name), size, *owner_mode_rdev, *ctime_mtime)
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            ino, future = self.pending.popleft()
            ref, written = future.result()
            self.conn.execute(
                "INSERT INTO block (ino, id, key) VALUES (?, ?, ?)", (ino, ref.id, ref.key)
            )
            self.stats.blocks += 1
            self.stats.blocks_written += written
        self.report()

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.progress or (not final and now - self.last_report < 0.5):
            return
        self.last_report = now
        elapsed = max(now - self.stats.started, 1e-9)
        # On a terminal the line rewrites itself; in a log each report is its own line.
        start, end = ("\r", "\n" if final else "") if sys.stderr.isatty() else ("", "\n")
        sys.stderr.write(
            f"{start}packed {self.stats.files} files, {self.stats.bytes / 2**20:.1f} MiB"
            f" ({self.stats.bytes / 1e6 / elapsed:.1f} MB/s), {self.stats.blocks} blocks" + end
        )
        sys.stderr.flush()

    def add_file(self, ino: int, path: Path) -> int:
        with path.open("rb", buffering=0) as handle:
            return self.add_data(ino, handle)

    def add_data(self, ino: int, handle: Readable) -> int:
        """Chunk, encode and store a file's content; returns the bytes read."""
        size = 0
        while True:
            buffer = bytearray(CHUNK_SIZE)
            filled = 0
            # Always cut full 512 KiB chunks: the readers assume it for all but the last one.
            while filled < CHUNK_SIZE:
                count = handle.readinto(memoryview(buffer)[filled:])
                if not count:
                    break
                filled += count
            if not filled:
                break
            size += filled
            self.pending.append(
                (ino, self.pool.submit(_encode_and_store, self.router, bytes(buffer[:filled])))
            )
            self.drain(_PENDING_CHUNKS)
            if filled < CHUNK_SIZE:
                break
        return size

    def link(self, ino: int, primary: int) -> None:
        """``ino`` is a hard link to ``primary``: an rfs-readable copy (same blocks) plus our link
        record for readers that know it."""
        self.drain(0)
        self.conn.execute(
            "INSERT INTO block (ino, id, key) SELECT ?, id, key FROM block"
            " WHERE ino = ? ORDER BY rowid",
            (ino, primary),
        )
        self.conn.execute(
            f"INSERT INTO {HARDLINK_TABLE} (ino, target) VALUES (?, ?)", (ino, primary)
        )
        self.conn.execute(  # the size the primary's blocks were cut for
            "UPDATE inode SET size = (SELECT size FROM inode WHERE ino = ?) WHERE ino = ?",
            (primary, ino),
        )
        self.stats.hardlinks += 1

    def add(self, parent: int, name: str, path: Path) -> int | None:
        """Insert one entry; returns its inode if it is a directory to descend into."""
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            self.stats.dirs += 1
            return self.insert(parent, name, st, st.st_size)
        if kind == stat.S_IFLNK:
            target = os.readlink(os.fsencode(path))
            ino = self.insert(parent, name, st, len(target))
            self.conn.execute("INSERT INTO extra (ino, data) VALUES (?, ?)", (ino, target))
            self.stats.symlinks += 1
        elif kind == stat.S_IFREG:
            ino = self.insert(parent, name, st, st.st_size)
            primary = self.links.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if primary is not None:
                self.link(ino, primary)
                return None
            if st.st_nlink > 1:
                self.links[(st.st_dev, st.st_ino)] = ino
            size = self.add_file(ino, path)
            if size != st.st_size:  # the file changed while we read it: record what we stored
                self.conn.execute("UPDATE inode SET size = ? WHERE ino = ?", (size, ino))
            self.stats.files += 1
            self.stats.bytes += size
        else:
            self.insert(parent, name, st, 0)
            self.stats.specials += 1
        return None

    def walk(self, source: Path) -> None:
        top = os.lstat(source)
        root = self.insert(0, "/", top, top.st_size)
        stack = [(root, source)]
        while stack:
            parent, directory = stack.pop()
            with os.scandir(directory) as listing:
                names = sorted(entry.name for entry in listing)
            later = []
            for name in names:
                child = directory / name
                ino = self.add(parent, name, child)
                if ino is not None:
                    later.append((ino, child))
            stack.extend(reversed(later))
        self.drain(0)


def pack(source: Path, output: Path, stores: Sequence[str], progress: bool = False) -> PackStats:
    """Pack the directory ``source`` into ``output`` (rfs v2 format); blocks go to ``stores``
    (``[xx-yy=]url``). The flist is written to a temporary file and renamed, so a failed pack
    leaves no ``output``.
    """
    if not source.is_dir():
        raise FlistError("source is not a directory", flist=output, path=str(source))
    return pack_with(lambda packer: packer.walk(source), output, stores, progress)


def pack_with(
    fill: Callable[[Packer], None],
    output: Path,
    stores: Sequence[str],
    progress: bool = False,
    tags: Mapping[str, str] | None = None,
) -> PackStats:
    """The pack transaction around ``fill``, which adds the entries (a directory walk, an
    archive's members)."""
    if not stores:
        raise StoreError("pack needs at least one --store", flist=output)
    router = Router.from_specs(list(stores), str(output))
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    packer = Packer(conn, router, progress)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")  # the rename below is the commit point
        create_schema(conn)
        for spec in stores:
            start, end, url = parse_spec(spec)
            conn.execute(
                "INSERT INTO route (start, end, url) VALUES (?, ?, ?)",
                (start, end, strip_password(url)),
            )
        conn.executemany("INSERT INTO tag (key, value) VALUES (?, ?)", sorted((tags or {}).items()))
        fill(packer)
        packer.drain(0)
        conn.commit()
        conn.close()
        os.replace(tmp, output)
    except OSError as exc:
        raise FlistError(f"pack failed: {exc}", flist=output, path=exc.filename) from None
    finally:
        packer.pool.shutdown(wait=True, cancel_futures=True)
        router.close()
        conn.close()
        tmp.unlink(missing_ok=True)
    stats = packer.stats
    stats.seconds = time.monotonic() - stats.started
    packer.report(final=True)
    log.info(
        "packed flist",
        flist=str(output),
        files=stats.files,
        bytes=stats.bytes,
        blocks=stats.blocks,
        written=stats.blocks_written,
        seconds=round(stats.seconds, 3),
    )
    return stats
