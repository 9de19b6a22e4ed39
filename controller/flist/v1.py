"""v1 ``.flist`` (0-fs/libflist): gzip'd tar of ``flistdb.sqlite3`` with capnp directory objects.

The tree is converted once, at open, into an in-memory database with the rfs v2 tables, so every
reader (ls, cat, unpack, mount, boot detection) has one code path. Block ids/keys stay 16 bytes,
which selects the v1 chunk codec.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import sqlite3
import stat
import tarfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from controller.flist.capnp import CapnpError, Message, Struct
from controller.flist.errors import FlistFormatError, FlistLimitError
from controller.flist.schema import INODE_INSERT, create_schema, lossy_text

log = structlog.get_logger(__name__)
DB_MEMBER = "flistdb.sqlite3"
# Where a v1 flist's blocks are when its metadata names no backend: the hub's 0-db, the storage
# URL zos hands g8ufs (rfs v1). ZMACHINE_FLIST_V1_STORE points at another hub's store.
HUB_STORE = os.environ.get("ZMACHINE_FLIST_V1_STORE", "zdb://hub.threefold.me:9900")
MAX_DB_SIZE = 1 << 30
MAX_DIRS = 1 << 22
DEFAULT_ID = 1000
DEFAULT_MODE = 0o400  # 0-fs's choice when an entry has no ACI row

# Field offsets follow the capnp layout of 0-flist's schema (units of the field's own size).
_INODE_SIZE, _INODE_WHICH, _INODE_MTIME, _INODE_CTIME = 0, 4, 3, 4
_INODE_NAME, _INODE_ATTR, _INODE_ACL = 0, 1, 2
_DIR_CONTENTS, _DIR_ACL, _DIR_LOCATION = 2, 4, 1
_DIR_MTIME, _DIR_CTIME = 2, 3
_ACI_UNAME, _ACI_GNAME, _ACI_MODE, _ACI_UID, _ACI_GID = 0, 1, 0, 1, 2
_WHICH_DIR, _WHICH_FILE, _WHICH_LINK, _WHICH_SPECIAL = 0, 1, 2, 3
_SPECIAL_TYPES = {0: stat.S_IFSOCK, 1: stat.S_IFBLK, 2: stat.S_IFCHR, 3: stat.S_IFIFO}


def dir_key(relpath: str) -> str:
    """libflist's key of a directory object: hex blake2b-128 of the path relative to the root."""
    return hashlib.blake2b(relpath.strip("/").encode(), digest_size=16).hexdigest()


def load_archive(path: Path) -> tuple[sqlite3.Connection, list[str]]:
    """Read ``flistdb.sqlite3`` out of the tar.gz and convert it."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = next((m for m in tar if m.isfile() and m.name.lstrip("./") == DB_MEMBER), None)
            if member is None:
                raise FlistFormatError(f"archive has no {DB_MEMBER}", flist=path)
            if member.size > MAX_DB_SIZE:
                raise FlistLimitError(f"{DB_MEMBER} of {member.size} bytes", flist=path)
            handle = tar.extractfile(member)
            assert handle is not None  # a regular member always has data
            data = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FlistFormatError(f"bad v1 archive: {exc}", flist=path) from None
    src = sqlite3.connect(":memory:")
    src.text_factory = lossy_text
    try:
        src.deserialize(data)
        return convert(src, path)
    except (sqlite3.Error, ValueError) as exc:  # ValueError: undecodable error text
        raise FlistFormatError(f"database error: {exc}", flist=path) from None
    finally:
        src.close()


def _backend_urls(src: sqlite3.Connection) -> list[str]:
    try:
        rows = src.execute("SELECT value FROM metadata WHERE key = 'backend'").fetchall()
    except sqlite3.OperationalError:  # old flists have no metadata table
        return []
    if not rows:
        return []
    try:
        backend = json.loads(rows[0][0])
        host, port = str(backend["host"]), int(backend.get("port", 9900))
    except (ValueError, KeyError, TypeError):
        return []
    namespace = str(backend.get("namespace") or "default")
    password = backend.get("password") or backend.get("token")
    auth = f":{password}@" if password else ""
    suffix = "" if namespace == "default" else f"/{namespace}"
    return [f"zdb://{auth}{host}:{port}{suffix}"]


@dataclass(frozen=True)
class _Acl:
    mode: int
    uid: int
    gid: int


def _owner(value: int, name: str | None, lookup: Any) -> int:
    if value >= 0:
        return value
    try:
        return int(lookup(name)) if name else DEFAULT_ID
    except KeyError:
        return DEFAULT_ID


class _Converter:
    def __init__(self, src: sqlite3.Connection, label: Path) -> None:
        self.src = src
        self.label = label
        self.acls: dict[str, _Acl] = {}
        self.dst = sqlite3.connect(":memory:", check_same_thread=False)
        create_schema(self.dst)

    def fail(self, message: str, path: str) -> FlistFormatError:
        return FlistFormatError(message, flist=self.label, path=path or "/")

    def value(self, key: str) -> bytes | None:
        row = self.src.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if not isinstance(row[0], bytes):
            raise self.fail(f"entry {key} is not a blob", "")
        return row[0]

    def root_object(self) -> tuple[str, bytes]:
        key = dir_key("")
        raw = self.value(key)
        if raw is not None:
            return key, raw
        # Jumpscale-era flists key directories differently; the root is the one with no location.
        for row_key, value in self.src.execute("SELECT key, value FROM entries"):
            if not isinstance(value, bytes):
                continue
            with contextlib.suppress(CapnpError):
                if Message(value).root().text(_DIR_LOCATION) == "":
                    return str(row_key), value
        raise self.fail("no root directory object", "/")

    def acl(self, key: str | None) -> _Acl:
        if not key:
            return _Acl(DEFAULT_MODE, DEFAULT_ID, DEFAULT_ID)
        if key not in self.acls:
            raw = self.value(key)
            if raw is None:
                self.acls[key] = _Acl(DEFAULT_MODE, DEFAULT_ID, DEFAULT_ID)
            else:
                aci = Message(raw).root()
                self.acls[key] = _Acl(
                    aci.uint16(_ACI_MODE) & 0o7777,
                    _owner(aci.int64(_ACI_UID, -1), aci.text(_ACI_UNAME), _uid_of),
                    _owner(aci.int64(_ACI_GID, -1), aci.text(_ACI_GNAME), _gid_of),
                )
        return self.acls[key]

    def insert(
        self,
        parent: int,
        name: str,
        kind: int,
        acl: _Acl,
        size: int,
        times: tuple[int, int],
        rdev: int = 0,
    ) -> int:
        cursor = self.dst.execute(
            INODE_INSERT,
            (parent, name, size, acl.uid, acl.gid, kind | acl.mode, rdev, times[0], times[1]),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def run(self) -> sqlite3.Connection:
        root_key, root_raw = self.root_object()
        root = Message(root_raw).root()
        root_ino = self.insert(
            0,
            "/",
            stat.S_IFDIR,
            self.acl(root.text(_DIR_ACL)),
            root.uint64(0),
            (root.uint32(_DIR_CTIME), root.uint32(_DIR_MTIME)),
        )
        seen = {root_key}
        queue: deque[tuple[str, int, str]] = deque([(root_key, root_ino, "")])
        while queue:
            key, ino, path = queue.popleft()
            raw = self.value(key)
            if raw is None:
                raise self.fail(f"directory object {key} is missing", path)
            for child in Message(raw).root().struct_list(_DIR_CONTENTS):
                sub = self.add_inode(child, ino, path)
                if sub is not None:
                    if sub[0] in seen:
                        raise self.fail(f"directory object {sub[0]} appears twice (cycle)", path)
                    if len(seen) >= MAX_DIRS:
                        raise FlistLimitError("too many directories", flist=self.label)
                    seen.add(sub[0])
                    queue.append(sub)
        return self.dst

    def add_inode(self, node: Struct, parent: int, parent_path: str) -> tuple[str, int, str] | None:
        name = node.text(_INODE_NAME) or ""
        path = f"{parent_path}/{name}"
        acl = self.acl(node.text(_INODE_ACL))
        times = (node.uint32(_INODE_CTIME), node.uint32(_INODE_MTIME))
        size = node.uint64(_INODE_SIZE)
        which = node.uint16(_INODE_WHICH)
        attr = node.struct(_INODE_ATTR)
        if attr is None:
            raise self.fail("inode without attributes", path)
        if which == _WHICH_DIR:
            ino = self.insert(parent, name, stat.S_IFDIR, acl, size, times)
            return (attr.text(0) or "", ino, path)
        if which == _WHICH_FILE:
            ino = self.insert(parent, name, stat.S_IFREG, acl, size, times)
            self.dst.executemany(
                "INSERT INTO block (ino, id, key) VALUES (?, ?, ?)",
                [(ino, b.data(0), b.data(1)) for b in attr.struct_list(0)],
            )
        elif which == _WHICH_LINK:
            target = (attr.text(0) or "").encode("utf-8", "surrogateescape")
            ino = self.insert(parent, name, stat.S_IFLNK, acl, len(target), times)
            self.dst.execute("INSERT INTO extra (ino, data) VALUES (?, ?)", (ino, target))
        elif which == _WHICH_SPECIAL:
            kind = _SPECIAL_TYPES.get(attr.uint16(0), 0)
            if not kind:  # rfs v1 leaves out what it cannot represent; so do we
                log.warning(
                    "skipping special entry of unknown type",
                    flist=str(self.label),
                    path=path,
                    type=attr.uint16(0),
                )
                return None
            rdev = _device(attr.data(0)) if kind in (stat.S_IFBLK, stat.S_IFCHR) else 0
            self.insert(parent, name, kind, acl, 0, times, rdev)
        else:
            raise self.fail(f"unsupported inode kind {which}", path)
        return None


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _device(data: bytes | None) -> int:
    try:
        major, minor = (int(x) for x in (data or b"").decode().split(","))
        return os.makedev(major, minor)
    except (ValueError, OverflowError):
        raise CapnpError(f"bad device numbers {data!r}") from None


def convert(src: sqlite3.Connection, label: Path) -> tuple[sqlite3.Connection, list[str]]:
    """Convert an opened ``flistdb.sqlite3`` into the v2 tables (in memory)."""
    converter = _Converter(src, label)
    try:
        dst = converter.run()
    except CapnpError as exc:
        converter.dst.close()
        raise FlistFormatError(f"bad directory object: {exc}", flist=label) from None
    except (sqlite3.Error, ValueError, OverflowError) as exc:  # e.g. undecodable text, huge ints
        converter.dst.close()
        raise FlistFormatError(f"database error: {exc}", flist=label) from None
    except FlistFormatError:
        converter.dst.close()
        raise
    dst.commit()
    return dst, _backend_urls(src)
