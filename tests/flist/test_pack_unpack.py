"""DIR -> pack -> unpack round trips and the exact rfs v2 on-disk format."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import snappy
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.flist.cache import BlockCache
from controller.flist.chunks import CHUNK_SIZE
from controller.flist.errors import FlistError, StoreError
from controller.flist.meta import open_flist
from controller.flist.pack import pack
from controller.flist.stores import Router
from controller.flist.unpack import unpack
from tests.flist.conftest import assert_same_tree, make_tree

LARGE = (3 * CHUNK_SIZE + 12345, CHUNK_SIZE, 2 * CHUNK_SIZE - 1)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("packed")
    source = make_tree(base / "src", files=2500, large=LARGE)
    store = base / "store"
    pack(source, base / "tree.fl", [f"dir://{store}"])
    return source, base / "tree.fl", store


def test_unpack_round_trip_is_exact(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    source, flist_path, _store = packed
    with open_flist(flist_path) as flist:
        cache = BlockCache(Router.from_specs(flist.store_specs()), tmp_path / "cache", "t")
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")


def test_schema_matches_rfs(packed: tuple[Path, Path, Path]) -> None:
    _, flist_path, _ = packed
    conn = sqlite3.connect(flist_path)
    columns = {
        table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        for table in ("inode", "extra", "block", "tag", "route")
    }
    assert columns == {
        "inode": ["ino", "parent", "name", "size", "uid", "gid", "mode", "rdev", "ctime", "mtime"],
        "extra": ["ino", "data"],
        "block": ["ino", "id", "key"],
        "tag": ["key", "value"],
        "route": ["start", "end", "url"],
    }
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"parents", "names", "block_ino"} <= indexes
    assert conn.execute("SELECT ino, parent, name FROM inode ORDER BY ino LIMIT 1").fetchone() == (
        1,
        0,
        "/",
    )
    link = conn.execute(
        "SELECT typeof(data), data FROM extra JOIN inode USING (ino) WHERE name = 'rel-link'"
    ).fetchone()
    assert link == ("blob", b"deep/data")
    assert conn.execute(
        "SELECT DISTINCT typeof(id), length(id), length(key) FROM block"
    ).fetchall() == [("blob", 32, 32)]


def test_blocks_are_rfs_chunks(packed: tuple[Path, Path, Path]) -> None:
    """Check the chunk pipeline independently of our decoder: 512 KiB chunks, key =
    blake2b-256(plain), AES-256-GCM with nonce key[:12] over raw snappy, id = blake2b-256(E),
    stored at store/hh/hex."""
    source, flist_path, store = packed
    conn = sqlite3.connect(flist_path)
    ino = conn.execute("SELECT ino FROM inode WHERE name = 'large0.bin'").fetchone()[0]
    rows = conn.execute("SELECT id, key FROM block WHERE ino = ? ORDER BY rowid", (ino,)).fetchall()
    data = (source / "large0.bin").read_bytes()
    assert len(rows) == 4
    for index, (block_id, key) in enumerate(rows):
        plain = data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
        assert key == hashlib.blake2b(plain, digest_size=32).digest()
        stored = (store / block_id.hex()).read_bytes()
        assert hashlib.blake2b(stored, digest_size=32).digest() == block_id
        assert snappy.decompress(AESGCM(key).decrypt(key[:12], stored, None)) == plain


def test_empty_files_have_no_blocks(packed: tuple[Path, Path, Path]) -> None:
    conn = sqlite3.connect(packed[1])
    assert conn.execute(
        "SELECT COUNT(*) FROM block JOIN inode USING (ino) WHERE inode.name = 'empty'"
    ).fetchone() == (0,)


def test_repack_writes_no_block_twice(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    source, _, store = packed
    before = sorted(p.name for p in store.rglob("*") if p.is_file())
    stats = pack(source, tmp_path / "again.fl", [f"dir://{store}"])
    assert stats.blocks > 0
    assert stats.blocks_written == 0
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == before


def test_routes_shard_and_strip_passwords(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", files=60, large=(CHUNK_SIZE * 3,))
    low, high = tmp_path / "low", tmp_path / "high"
    stats = pack(source, tmp_path / "t.fl", [f"00-7f=dir://{low}", f"80-ff=dir://{high}"])
    low_ids = {p.name for p in low.rglob("*") if p.is_file()}
    high_ids = {p.name for p in high.rglob("*") if p.is_file()}
    assert low_ids and high_ids and len(low_ids) + len(high_ids) == stats.blocks_written
    assert all(int(name[:2], 16) < 0x80 for name in low_ids)
    assert all(int(name[:2], 16) >= 0x80 for name in high_ids)
    conn = sqlite3.connect(tmp_path / "t.fl")
    assert conn.execute("SELECT start, end, url FROM route").fetchall() == [
        (0, 127, f"dir://{low}"),
        (128, 255, f"dir://{high}"),
    ]


def test_failed_pack_leaves_no_output(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", files=5)
    with pytest.raises(StoreError):
        pack(source, tmp_path / "t.fl", ["zdb://127.0.0.1:1"])  # nothing listens on port 1
    assert not (tmp_path / "t.fl").exists()
    assert list(tmp_path.glob(".t.fl*")) == []


def test_unpack_refuses_non_empty_target(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").touch()
    with open_flist(packed[1]) as flist, pytest.raises(FlistError, match="not empty"):
        unpack(
            flist, BlockCache(Router.from_specs(flist.store_specs()), None, "t"), tmp_path / "out"
        )


def test_cli_pack_ls_cat_unpack(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", files=30, large=(CHUNK_SIZE + 7,))
    cli = [sys.executable, "-m", "controller.flist.cli"]
    done = subprocess.run(
        [
            *cli,
            "pack",
            str(source),
            "-o",
            str(tmp_path / "t.fl"),
            "--store",
            f"dir://{tmp_path / 'store'}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "packed" in done.stderr  # progress line
    listing = subprocess.run(
        [*cli, "ls", "-R", str(tmp_path / "t.fl")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "/sub/deep/data" in listing and "/large0.bin" in listing
    cat = subprocess.run(
        [*cli, "cat", str(tmp_path / "t.fl"), "/sub/rel-link", "--cache", str(tmp_path / "c")],
        capture_output=True,
        check=True,
    )
    assert cat.stdout == (source / "sub/deep/data").read_bytes()
    subprocess.run(
        [
            *cli,
            "unpack",
            str(tmp_path / "t.fl"),
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "c"),
        ],
        check=True,
        capture_output=True,
    )
    assert_same_tree(source, tmp_path / "out")
    inspect = subprocess.run(
        [*cli, "inspect", str(tmp_path / "t.fl")], capture_output=True, text=True, check=True
    ).stdout
    assert "v2 (rfs .fl)" in inspect and "boot mode: container" in inspect
