"""Builds v1 ``.flist`` files the way libflist does (per the reference, section 2), encoding the
capnp objects with the real Cap'n Proto compiler (`capnp encode`, Debian package capnproto) so our
hand-written decoder is checked against the reference implementation of the wire format."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path

from controller.flist.chunks import CHUNK_SIZE, encode_v1
from controller.flist.stores import Store

SCHEMA = Path(__file__).parent / "data" / "flist.capnp"
CAPNP = shutil.which("capnp")
_SPECIAL = {
    stat.S_IFSOCK: "socket",
    stat.S_IFBLK: "block",
    stat.S_IFCHR: "chardev",
    stat.S_IFIFO: "fifopipe",
}


def encode(struct_name: str, text: str) -> bytes:
    assert CAPNP is not None
    return subprocess.run(
        [CAPNP, "encode", str(SCHEMA), struct_name],
        input=text.encode(),
        capture_output=True,
        check=True,
    ).stdout


def quote(value: str | bytes) -> str:
    return json.dumps(value if isinstance(value, str) else value.decode())


def data(value: bytes) -> str:
    return f'0x"{value.hex()}"'


def dir_key(rel: str) -> str:
    return hashlib.blake2b(rel.encode(), digest_size=16).hexdigest()


class V1Builder:
    def __init__(
        self, store: Store, unknown_owner: str | None = None, unknown_special: str | None = None
    ) -> None:
        self.store = store
        self.entries: dict[str, bytes] = {}
        self.unknown_owner = unknown_owner  # a file whose ACI says uid -1 + this user name
        self.unknown_special = unknown_special  # a special file written with type "unknown"

    def acl(
        self,
        st: os.stat_result,
        uname: str = "",
        gname: str = "",
        uid: int | None = None,
    ) -> str:
        mode = stat.S_IMODE(st.st_mode)
        uid = st.st_uid if uid is None else uid
        gid = st.st_gid if uid >= 0 else -1
        text = f"user:{uname}\ngroup:{gname}\nmode:0o{mode:o}\nuid:{uid}\ngid:{gid}"
        key = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        self.entries[key] = encode(
            "ACI",
            f"(uname = {quote(uname)}, gname = {quote(gname)}, mode = {mode},"
            f" uid = {uid}, gid = {gid})",
        )
        return key

    def blocks(self, path: Path) -> str:
        refs = []
        content = path.read_bytes()
        for offset in range(0, len(content), CHUNK_SIZE):
            ref, stored = encode_v1(content[offset : offset + CHUNK_SIZE])
            self.store.set(ref.id, stored)
            refs.append(f"(hash = {data(ref.id)}, key = {data(ref.key)})")
        return f"(blockSize = 128, blocks = [{', '.join(refs)}])"

    def inode(self, path: Path, rel: str) -> str:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        size = st.st_size
        if kind == stat.S_IFDIR:
            attrs = f"dir = (key = {quote(dir_key(rel))})"
        elif kind == stat.S_IFREG:
            attrs = f"file = {self.blocks(path)}"
        elif kind == stat.S_IFLNK:
            attrs = f"link = (target = {quote(os.readlink(path))})"
        else:
            numbers = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
            payload = numbers if kind in (stat.S_IFBLK, stat.S_IFCHR) else "(nothing)"
            kind_name = "unknown" if path.name == self.unknown_special else _SPECIAL[kind]
            attrs = f"special = (type = {kind_name}, data = {data(payload.encode())})"
            size = 0
        if self.unknown_owner and path.name == self.unknown_owner:
            aclkey = self.acl(st, uname="root", gname="root", uid=-1)
        else:
            aclkey = self.acl(st)
        return (
            f"(name = {quote(path.name)}, size = {size}, attributes = ({attrs}),"
            f" aclkey = {quote(aclkey)}, modificationTime = {int(st.st_mtime)},"
            f" creationTime = {int(st.st_ctime)})"
        )

    def add_dir(self, root: Path, rel: str) -> None:
        path = root / rel if rel else root
        st = os.lstat(path)
        contents = []
        for child in sorted(path.iterdir()):
            child_rel = f"{rel}/{child.name}" if rel else child.name
            contents.append(self.inode(child, child_rel))
            if child.is_dir() and not child.is_symlink():
                self.add_dir(root, child_rel)
        parent = dir_key(rel.rpartition("/")[0]) if rel else ""
        self.entries[dir_key(rel)] = encode(
            "Dir",
            f"(name = {quote(path.name if rel else '')}, location = {quote(rel)},"
            f" contents = [{', '.join(contents)}], parent = {quote(parent)}, size = 4096,"
            f" aclkey = {quote(self.acl(st))}, modificationTime = {int(st.st_mtime)},"
            f" creationTime = {int(st.st_ctime)})",
        )

    def database(self, backend: dict[str, object] | None) -> bytes:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE entries (key VARCHAR(64) PRIMARY KEY, value BLOB)")
        conn.execute("CREATE TABLE metadata (key VARCHAR(64) PRIMARY KEY, value TEXT)")
        conn.executemany("INSERT INTO entries VALUES (?, ?)", self.entries.items())
        if backend is not None:
            conn.execute("INSERT INTO metadata VALUES ('backend', ?)", (json.dumps(backend),))
        conn.commit()
        return conn.serialize()


def build_v1(
    source: Path,
    output: Path,
    store: Store,
    backend: dict[str, object] | None = None,
    unknown_owner: str | None = None,
    unknown_special: str | None = None,
) -> Path:
    """Write ``output`` (.flist: tar.gz holding ./flistdb.sqlite3) for the tree at ``source``."""
    builder = V1Builder(store, unknown_owner, unknown_special)
    builder.add_dir(source, "")
    db = builder.database(backend)
    with tarfile.open(output, "w:gz") as tar:
        info = tarfile.TarInfo("./flistdb.sqlite3")
        info.size = len(db)
        tar.addfile(info, io.BytesIO(db))
    return output
