"""Reading flist metadata: one model (the rfs v2 tables) for ``.fl`` and converted v1 flists."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from controller.flist import pathres, v1
from controller.flist.chunks import V1_HASH_SIZE, V2_HASH_SIZE, BlockRef
from controller.flist.errors import (
    FlistError,
    FlistFormatError,
    FlistLimitError,
    FlistNameError,
    FlistNotADirectoryError,
    FlistNotFoundError,
)
from controller.flist.schema import HARDLINK_TABLE, lossy_text

SQLITE_MAGIC = b"SQLite format 3\0"
GZIP_MAGIC = b"\x1f\x8b"
MAX_FILE_SIZE = 1 << 40  # 1 TiB: beyond any root filesystem file we would serve
MAX_LINK_TARGET = 4095
MAX_DEPTH = 4096
FILE_TYPES = frozenset(
    {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFBLK, stat.S_IFCHR, stat.S_IFIFO}
    | {stat.S_IFSOCK}
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME_LIMIT = 1 << 33  # seconds, ~year 2242; keeps nanoseconds within int64
_RANGES = (
    ("size", 0, MAX_FILE_SIZE),
    ("mode", 0, 0o177777),
    ("uid", 0, 2**32 - 1),
    ("gid", 0, 2**32 - 1),
    ("rdev", 0, 2**64 - 1),
    ("mtime", -_TIME_LIMIT, _TIME_LIMIT),
    ("ctime", -_TIME_LIMIT, _TIME_LIMIT),
)
_SELECT = (
    "SELECT inode.ino, inode.parent, inode.name, inode.size, inode.uid, inode.gid, inode.mode,"
    " inode.rdev, inode.ctime, inode.mtime, extra.data"
    " FROM inode LEFT JOIN extra ON extra.ino = inode.ino"
)


@dataclass(frozen=True)
class Entry:
    """One filesystem entry as stored in the flist."""

    ino: int
    parent: int
    name: str
    size: int
    uid: int
    gid: int
    mode: int
    rdev: int
    ctime: int
    mtime: int
    target: bytes | None  # symlink target, verbatim

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.kind == stat.S_IFREG

    @property
    def is_link(self) -> bool:
        return self.kind == stat.S_IFLNK


@dataclass(frozen=True)
class RunSettings:
    entrypoint: str  # one shell-quoted command line, as a Zmachine's entrypoint
    env: dict[str, str]
    workdir: str


@dataclass(frozen=True)
class Route:
    start: int
    end: int
    url: str


def _name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise TypeError(f"name of type {type(value).__name__}")


class Flist:
    """An open flist. Thread-safe: queries are serialised on one SQLite connection."""

    def __init__(
        self, path: Path, conn: sqlite3.Connection, version: int, backends: list[str]
    ) -> None:
        self.path = path
        self.label = str(path)
        self.version = version
        self.backends = backends  # v1: stores named by the flist's own metadata
        self._conn = conn
        self._lock = threading.Lock()
        self.hash_size = V2_HASH_SIZE if version == 2 else V1_HASH_SIZE
        self.root = self._find_root()
        self.hardlinks: dict[int, int] = {}
        self.link_counts: dict[int, int] = {}
        self.shadowed: set[int] = set()  # entries whose lossy name an earlier sibling took

    # -- low level ----------------------------------------------------------------------------
    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        except (sqlite3.Error, ValueError, OverflowError) as exc:  # ValueError: bad text
            raise FlistFormatError(f"database error: {exc}", flist=self.label) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Flist:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        ino, parent, name, size, uid, gid, mode, rdev, ctime, mtime, data = row
        try:
            entry = Entry(
                ino=int(ino),
                parent=int(parent),
                name=_name(name),
                size=int(size),
                uid=int(uid),
                gid=int(gid),
                mode=int(mode),
                rdev=int(rdev or 0),
                ctime=int(ctime or 0),
                mtime=int(mtime or 0),
                target=data.encode() if isinstance(data, str) else data,
            )
        except (TypeError, ValueError) as exc:
            raise FlistFormatError(f"bad inode row {ino!r}: {exc}", flist=self.label) from None
        for field, low, high in _RANGES:
            if not low <= getattr(entry, field) <= high:
                raise FlistLimitError(
                    f"{field} {getattr(entry, field)} out of range",
                    flist=self.label,
                    path=self.path_of(entry.ino),
                )
        if entry.kind not in FILE_TYPES:
            raise FlistFormatError(
                f"unknown file type in mode {entry.mode:o}",
                flist=self.label,
                path=self.path_of(entry.ino),
            )
        if entry.is_link and (entry.target is None or len(entry.target) > MAX_LINK_TARGET):
            raise FlistFormatError(
                "symlink without a valid target", flist=self.label, path=self.path_of(entry.ino)
            )
        return entry

    def _one(self, where: str, args: tuple[Any, ...]) -> Entry | None:
        rows = self.query(f"{_SELECT} WHERE {where} LIMIT 1", args)
        return self._entry(rows[0]) if rows else None

    # -- validation ---------------------------------------------------------------------------
    def _find_root(self) -> Entry:
        root = self._one("inode.parent = 0 ORDER BY inode.ino", ())
        if root is None:
            raise FlistFormatError("no root inode (parent 0)", flist=self.label)
        if not root.is_dir:
            raise FlistFormatError("root inode is not a directory", flist=self.label)
        return root

    def validate(self, deep: bool = False) -> None:
        """Reject what could be served wrongly: bad names, duplicates, absurd sizes."""
        if deep:
            rows = self.query("PRAGMA quick_check")
            if rows != [("ok",)]:
                raise FlistFormatError(f"integrity check failed: {rows[:3]}", flist=self.label)
        bad = self.query(
            "SELECT ino, parent, name FROM inode WHERE parent != 0 AND (name IS NULL OR name = ''"
            " OR name = '.' OR name = '..' OR instr(name, '/') > 0 OR instr(name, char(0)) > 0)"
            " LIMIT 1"
        )
        if bad:
            _, parent, name = bad[0]
            raise FlistNameError(
                f"invalid entry name {name!r}", flist=self.label, path=self.path_of(parent)
            )
        # Names that were not UTF-8 are stored lossily (U+FFFD), as rfs does, so two of them can
        # collide. rfs packs and mounts such trees and its lookup finds the first; so do we, and
        # the later ones are hidden. Any other duplicate is a damaged or forged flist.
        dup = self.query(
            "SELECT parent, name FROM inode WHERE instr(name, char(65533)) = 0"
            " GROUP BY parent, name HAVING COUNT(*) > 1 LIMIT 1"
        )
        if dup:
            parent, name = dup[0]
            raise FlistNameError(
                f"duplicate entry name {_name(name)!r}",
                flist=self.label,
                path=self.path_of(parent),
            )
        self.shadowed = {
            int(row[0])
            for row in self.query(
                "SELECT ino FROM inode AS later WHERE instr(name, char(65533)) > 0 AND EXISTS"
                " (SELECT 1 FROM inode AS first WHERE first.parent = later.parent"
                " AND first.name = later.name AND first.ino < later.ino)"
            )
        }
        huge = self.query(
            "SELECT ino, size FROM inode WHERE typeof(size) != 'integer' OR size < 0 OR size > ?"
            " LIMIT 1",
            (MAX_FILE_SIZE,),
        )
        if huge:
            raise FlistLimitError(
                f"entry size {huge[0][1]!r} is out of range",
                flist=self.label,
                path=self.path_of(huge[0][0]),
            )
        if self.version == 2 and self.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (HARDLINK_TABLE,)
        ):
            self._load_hardlinks()

    def _load_hardlinks(self) -> None:
        for ino, target in self.query(f"SELECT ino, target FROM {HARDLINK_TABLE}"):
            if not (isinstance(ino, int) and isinstance(target, int)) or ino == target:
                raise FlistFormatError(f"bad hard link {ino!r} -> {target!r}", flist=self.label)
            if not (self.get(target).is_file and self.get(ino).is_file):
                raise FlistFormatError(f"hard link {ino} -> {target}: not files", flist=self.label)
            self.hardlinks[ino] = target
        for target in self.hardlinks.values():
            if target in self.hardlinks:
                raise FlistFormatError(f"hard link chain through {target}", flist=self.label)
            self.link_counts[target] = self.link_counts.get(target, 1) + 1

    # -- navigation ---------------------------------------------------------------------------
    def get(self, ino: int) -> Entry:
        entry = self._one("inode.ino = ?", (ino,))
        if entry is None:
            raise FlistNotFoundError(f"no inode {ino}", flist=self.label)
        return entry

    def path_of(self, ino: Any) -> str:
        """Best-effort path of an inode, for messages (bounded; never raises)."""
        parts: list[str] = []
        for _ in range(MAX_DEPTH):
            try:
                rows = self.query("SELECT parent, name FROM inode WHERE ino = ?", (ino,))
                if not rows or not rows[0][0]:
                    break
                ino = int(rows[0][0])
                parts.append(_name(rows[0][1]))
            except (FlistError, TypeError, ValueError):
                break
        return "/" + "/".join(reversed(parts))

    def lookup(self, parent: int, name: str) -> Entry | None:
        return self._one("inode.parent = ? AND inode.name = ? ORDER BY inode.ino", (parent, name))

    def children(self, ino: int) -> list[Entry]:
        rows = self.query(f"{_SELECT} WHERE inode.parent = ? ORDER BY inode.ino", (ino,))
        entries = [self._entry(row) for row in rows]
        return [e for e in entries if e.ino != e.parent and e.ino not in self.shadowed]

    def walk(self) -> Iterator[tuple[str, Entry]]:
        """Every entry reachable from the root, depth first, as ("/path", entry)."""
        yield "/", self.root
        stack: list[tuple[str, Entry]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            later = []
            for child in self.children(directory.ino):
                path = f"{prefix}/{child.name}"
                yield path, child
                if child.is_dir:
                    later.append((path, child))
            stack.extend(reversed(later))

    def entry_at(self, parts: pathres.Parts) -> Entry | None:
        """The entry at already-resolved components (no link following), or None."""
        entry = self.root
        for i, part in enumerate(parts):
            if not entry.is_dir:
                raise FlistNotADirectoryError(
                    f"{pathres.show(parts[:i])} is not a directory", flist=self.label
                )
            found = self.lookup(entry.ino, part)
            if found is None:
                return None
            entry = found
        return entry

    def lstat_kind(self, parts: pathres.Parts) -> int | None:
        entry = self.entry_at(parts)
        return None if entry is None else entry.kind

    def readlink(self, parts: pathres.Parts) -> str:
        entry = self.entry_at(parts)
        if entry is None or entry.target is None:
            raise FlistNotFoundError("not a symlink", flist=self.label, path=pathres.show(parts))
        return entry.target.decode("utf-8", "surrogateescape")

    def resolve(self, path: str, *, follow: bool = True) -> tuple[str, Entry]:
        """Resolve ``path`` (links followed inside the flist root); returns (real path, entry)."""
        parts = pathres.resolve(self, path, follow_final=follow)
        entry = self.entry_at(parts)
        if entry is None:
            raise FlistNotFoundError("does not exist", flist=self.label, path=path)
        return pathres.show(parts), entry

    # -- data ---------------------------------------------------------------------------------
    def blocks(self, entry: Entry) -> list[BlockRef]:
        """The ordered chunks of a regular file.

        Their count need not match the size: readers serve what the blocks hold, as rfs does.
        """
        refs = []
        for block_id, key in self.query(
            "SELECT id, key FROM block WHERE ino = ? ORDER BY rowid", (entry.ino,)
        ):
            if not (
                isinstance(block_id, bytes)
                and isinstance(key, bytes)
                and len(block_id) == len(key) == self.hash_size
            ):
                raise FlistFormatError(
                    f"block row with id/key that are not {self.hash_size}-byte blobs",
                    flist=self.label,
                    path=self.path_of(entry.ino),
                )
            refs.append(BlockRef(block_id, key))
        return refs

    def routes(self) -> list[Route]:
        if self.version != 2:
            return []
        rows = self.query("SELECT start, end, url FROM route ORDER BY rowid")
        try:
            return [Route(int(s), int(e), str(u)) for s, e, u in rows]
        except (TypeError, ValueError) as exc:
            raise FlistFormatError(f"bad route row: {exc}", flist=self.label) from None

    def tags(self) -> dict[str, str]:
        if self.version != 2:
            return {}
        return {str(k): str(v) for k, v in self.query("SELECT key, value FROM tag")}

    def run_settings(self) -> RunSettings:
        """An image's entrypoint, env and working directory, from the tags ``pack`` writes for
        container images (empty when absent; a malformed env tag counts as none)."""
        tags = self.tags()
        try:
            env = json.loads(tags.get("env", "{}"))
        except ValueError:
            env = {}
        if not isinstance(env, dict):
            env = {}
        return RunSettings(
            tags.get("entrypoint", ""),
            {str(k): str(v) for k, v in env.items() if _ENV_NAME.fullmatch(str(k))},
            tags.get("workdir", ""),
        )

    def store_specs(self) -> list[str]:
        """Store specs (``xx-yy=url``) this flist names for its blocks."""
        specs = [f"{r.start:02x}-{r.end:02x}={r.url}" for r in self.routes()]
        if specs or self.version == 2:
            return specs
        return list(self.backends) or [v1.HUB_STORE]

    def count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM inode")[0][0])

    def total_size(self) -> int:
        rows = self.query(
            "SELECT COALESCE(SUM(size), 0) FROM inode WHERE (mode & ?) = ?",
            (0o170000, stat.S_IFREG),
        )
        return int(rows[0][0])


def _check_sqlite_size(path: Path, header: bytes) -> None:
    """A truncated database may still answer the queries that miss its lost pages: compare the
    size the header records with the file's."""
    if len(header) < 100:
        raise FlistFormatError("truncated SQLite header", flist=path)
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96] and pages > 0
    actual = path.stat().st_size
    if header_valid and actual < page_size * pages:
        raise FlistFormatError(
            f"truncated database: {actual} of {page_size * pages} bytes", flist=path
        )
    if actual % max(page_size, 1) or page_size < 512:
        raise FlistFormatError(f"database size {actual} is not a whole number of pages", flist=path)


def _open_sqlite(path: Path) -> sqlite3.Connection:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.text_factory = lossy_text
    return conn


def open_flist(path: Path, *, deep_check: bool = False) -> Flist:
    """Open and validate a ``.fl`` (SQLite) or ``.flist`` (gzip'd tar) file.

    ``deep_check`` adds SQLite's page-level integrity check (done once when fetching).
    """
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        raise FlistFormatError(f"cannot read: {exc.strerror}", flist=path) from None
    magic = header[: len(SQLITE_MAGIC)]
    if magic.startswith(GZIP_MAGIC):
        conn, backends = v1.load_archive(path)
        flist = Flist(path, conn, 1, backends)
    elif magic == SQLITE_MAGIC:
        _check_sqlite_size(path, header)
        conn = _open_sqlite(path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except (sqlite3.Error, ValueError) as exc:  # ValueError: undecodable error text
            conn.close()
            raise FlistFormatError(f"database error: {exc}", flist=path) from None
        if {"inode", "block"} <= tables:
            flist = Flist(path, conn, 2, [])
        elif "entries" in tables:
            mem, backends = v1.convert(conn, path)
            conn.close()
            flist = Flist(path, mem, 1, backends)
        else:
            conn.close()
            raise FlistFormatError("SQLite file without flist tables", flist=path)
    else:
        raise FlistFormatError("not an flist (neither SQLite nor gzip data)", flist=path)
    try:
        flist.validate(deep=deep_check)
    except FlistError:
        flist.close()
        raise
    return flist
