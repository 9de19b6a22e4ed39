"""Bad input: every failure is a typed FlistError naming the flist and the path."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import snappy
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.flist.cache import BlockCache
from controller.flist.chunks import CHUNK_SIZE, BlockRef, decode, encode_v2
from controller.flist.errors import (
    BlockCorruptError,
    BlockMissingError,
    FlistError,
    FlistFormatError,
    FlistLimitError,
    FlistLinkError,
    FlistNameError,
    FlistNotADirectoryError,
    FlistNotFoundError,
)
from controller.flist.meta import open_flist
from controller.flist.pack import pack
from controller.flist.stores import DirStore, Router
from controller.flist.unpack import unpack
from tests.flist.v1_builder import CAPNP, dir_key, encode


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "file").write_bytes(os.urandom(CHUNK_SIZE + 100))
    (source / "small").write_bytes(b"abc")
    os.symlink("loop-b", source / "loop-a")
    os.symlink("loop-a", source / "loop-b")
    os.symlink("../../../etc/passwd", source / "d" / "escape")
    store = tmp_path / "store"
    pack(source, tmp_path / "t.fl", [f"dir://{store}"])
    return tmp_path / "t.fl", store


def edited(flist: Path, sql: str) -> Path:
    copy = flist.with_name("edited.fl")
    shutil.copyfile(flist, copy)
    conn = sqlite3.connect(copy)
    conn.execute(sql)
    conn.commit()
    conn.close()
    return copy


def read_everything(path: Path, store: Path) -> None:
    with open_flist(path) as flist:
        cache = BlockCache(Router.from_specs([f"dir://{store}"]), None, flist.label)
        for _, entry in flist.walk():
            if entry.is_file:
                cache.read(flist.blocks(entry), entry.size, 0, entry.size)


def test_not_an_flist(tmp_path: Path) -> None:
    for content in (b"", b"hello world, not a database", b"\x1f\x8b garbage"):
        (tmp_path / "x.fl").write_bytes(content)
        with pytest.raises(FlistFormatError, match=r"x\.fl"):
            open_flist(tmp_path / "x.fl")
    with pytest.raises(FlistFormatError, match="cannot read"):
        open_flist(tmp_path / "missing.fl")


def test_truncated_database(small: tuple[Path, Path], tmp_path: Path) -> None:
    data = small[0].read_bytes()
    for cut in (100, len(data) // 2, len(data) - 1000):
        (tmp_path / "cut.fl").write_bytes(data[:cut])
        with pytest.raises(FlistFormatError):
            read_everything(tmp_path / "cut.fl", small[1])


def test_corrupt_pages(small: tuple[Path, Path], tmp_path: Path) -> None:
    data = bytearray(small[0].read_bytes())
    for page in range(1, len(data) // 4096):
        data[page * 4096 : page * 4096 + 64] = b"\xee" * 64
    (tmp_path / "bad.fl").write_bytes(bytes(data))
    with pytest.raises(FlistFormatError):
        open_flist(tmp_path / "bad.fl", deep_check=True)


@pytest.mark.parametrize("name", ["a/b", "..", ".", ""])
def test_bad_names(small: tuple[Path, Path], name: str) -> None:
    path = edited(small[0], f"UPDATE inode SET name = '{name}' WHERE name = 'file'")
    with pytest.raises(FlistNameError, match=r"path /d: invalid entry name"):
        open_flist(path)


def test_duplicate_names(small: tuple[Path, Path]) -> None:
    path = edited(small[0], "UPDATE inode SET name = 'loop-a' WHERE name = 'loop-b'")
    with pytest.raises(FlistNameError, match="duplicate entry name 'loop-a'"):
        open_flist(path)


def test_absurd_and_inconsistent_sizes(small: tuple[Path, Path]) -> None:
    path = edited(small[0], "UPDATE inode SET size = 1 << 55 WHERE name = 'file'")
    with pytest.raises(FlistLimitError, match="path /d/file"):
        open_flist(path)


def test_block_count_not_matching_the_size_serves_what_it_has(
    small: tuple[Path, Path], tmp_path: Path
) -> None:
    """rfs serves such files instead of failing them; so do we (short at the end of the data)."""
    flist_path, store = small
    real = (tmp_path / "src" / "d" / "file").read_bytes()
    claims_more = edited(flist_path, "UPDATE inode SET size = 10 * 524288 WHERE name = 'file'")
    with open_flist(claims_more) as flist:
        entry = flist.resolve("/d/file")[1]
        cache = BlockCache(Router.from_specs([f"dir://{store}"]), None, flist.label)
        assert len(flist.blocks(entry)) == 2
        assert cache.read(flist.blocks(entry), entry.size, 0, entry.size) == real
        assert cache.read(flist.blocks(entry), entry.size, CHUNK_SIZE + 50, 1000) == real[-50:]
        assert cache.read(flist.blocks(entry), entry.size, 3 * CHUNK_SIZE, 10) == b""
        unpack(flist, cache, tmp_path / "more")
    assert (tmp_path / "more" / "d" / "file").read_bytes() == real
    claims_less = edited(flist_path, "UPDATE inode SET size = 7 WHERE name = 'file'")
    with open_flist(claims_less) as flist:
        cache = BlockCache(Router.from_specs([f"dir://{store}"]), None, flist.label)
        unpack(flist, cache, tmp_path / "less")
        assert cache.fetched == 2  # the block beyond the size is never fetched
    assert (tmp_path / "less" / "d" / "file").read_bytes() == real[:7]


def test_bad_hard_link_records(small: tuple[Path, Path]) -> None:
    ino = "(SELECT ino FROM inode WHERE name = '{}')".format
    chain = edited(
        small[0],
        f"INSERT INTO zm_hardlink VALUES ({ino('small')}, {ino('file')}),"
        f" ({ino('file')}, {ino('small')})",
    )
    with pytest.raises(FlistFormatError, match="hard link chain"):
        open_flist(chain)
    to_dir = edited(small[0], f"INSERT INTO zm_hardlink VALUES ({ino('small')}, {ino('d')})")
    with pytest.raises(FlistFormatError, match="not files"):
        open_flist(to_dir)


def test_links_that_loop_or_escape(small: tuple[Path, Path]) -> None:
    with open_flist(small[0]) as flist:
        with pytest.raises(FlistLinkError, match="too many levels"):
            flist.resolve("/loop-a")
        with pytest.raises(FlistLinkError, match="climbs above the root"):
            flist.resolve("/d/escape")
        with pytest.raises(FlistNotFoundError, match="/nope"):
            flist.resolve("/nope/x")
        with pytest.raises(FlistNotADirectoryError, match="/small"):
            flist.resolve("/small/x")


def test_missing_block_names_flist_and_path(small: tuple[Path, Path], tmp_path: Path) -> None:
    flist_path, store = small
    conn = sqlite3.connect(flist_path)
    hexid = conn.execute("SELECT id FROM block ORDER BY rowid DESC LIMIT 1").fetchone()[0].hex()
    (store / hexid).unlink()
    with open_flist(flist_path) as flist:
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        with pytest.raises(BlockMissingError) as info:
            unpack(flist, cache, tmp_path / "out")
    assert info.value.flist == str(flist_path)
    assert info.value.path in ("/d/file", "/small")
    names = {p.name for p in (tmp_path / "out").rglob("*")}
    assert "file" not in names  # never a partial file passed off as whole
    assert not [name for name in names if name.endswith(".partial")]


def test_short_middle_chunk_ends_the_data(small: tuple[Path, Path], tmp_path: Path) -> None:
    """Readers cut files in full 512 KiB chunks; a valid but short chunk in the middle ends what
    is served there instead of shifting the rest of the file."""
    flist_path, store = small
    ref, stored = encode_v2(b"short")
    DirStore(f"dir://{store}").set(ref.id, stored)
    conn = sqlite3.connect(flist_path)
    ino = conn.execute("SELECT ino FROM inode WHERE name = 'file'").fetchone()[0]
    first = conn.execute("SELECT MIN(rowid) FROM block WHERE ino = ?", (ino,)).fetchone()[0]
    conn.execute("UPDATE block SET id = ?, key = ? WHERE rowid = ?", (ref.id, ref.key, first))
    conn.commit()
    with open_flist(flist_path) as flist:
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "out")
        assert cache.fetched == 2  # "short" and "abc": nothing after the short chunk
    assert (tmp_path / "out" / "d" / "file").read_bytes() == b"short"


def test_block_failing_its_key_check() -> None:
    good, _ = encode_v2(b"the real content")
    # A block that decrypts fine with the key but whose content is not what the key promises.
    forged = AESGCM(good.key).encrypt(good.key[:12], snappy.compress(b"something else"), None)
    with pytest.raises(BlockCorruptError, match="does not match its key"):
        decode(forged, BlockRef(good.id, good.key))
    with pytest.raises(BlockCorruptError, match="authentication failed"):
        decode(forged[:-1] + bytes([forged[-1] ^ 1]), good)
    bomb = AESGCM(good.key).encrypt(good.key[:12], b"\xff\xff\xff\xff\x0f" + b"\0" * 10, None)
    with pytest.raises(BlockCorruptError, match="more than one chunk"):
        decode(bomb, good)


def test_damaged_cache_file_is_refetched(small: tuple[Path, Path], tmp_path: Path) -> None:
    flist_path, _store = small
    with open_flist(flist_path) as flist:
        entry = flist.resolve("/small")[1]
        (ref,) = flist.blocks(entry)
        cache = BlockCache(Router.from_specs(flist.store_specs()), tmp_path / "c", flist.label)
        assert cache.get(ref) == b"abc"
        cached = cache.path_for(ref)
        assert cached is not None
        cached.write_bytes(b"ab")  # e.g. a crash mid-write by another tool
        fresh = BlockCache(Router.from_specs(flist.store_specs()), tmp_path / "c", flist.label)
        assert fresh.get(ref) == b"abc" and fresh.fetched == 1
        assert cached.read_bytes() == b"abc"


@pytest.mark.skipif(CAPNP is None, reason="capnp not installed")
def test_v1_directory_cycle(tmp_path: Path) -> None:
    import io
    import tarfile

    root = encode(
        "Dir",
        f'(location = "", contents = [(name = "loop", attributes = (dir = '
        f'(key = "{dir_key("")}")))])',
    )
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE entries (key VARCHAR(64) PRIMARY KEY, value BLOB)")
    conn.execute("INSERT INTO entries VALUES (?, ?)", (dir_key(""), root))
    db = conn.serialize()
    with tarfile.open(tmp_path / "c.flist", "w:gz") as tar:
        info = tarfile.TarInfo("flistdb.sqlite3")
        info.size = len(db)
        tar.addfile(info, io.BytesIO(db))
    with pytest.raises(FlistFormatError, match="cycle"):
        open_flist(tmp_path / "c.flist")


def test_cli_reports_errors_without_traceback(small: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "junk.fl").write_bytes(b"junk")
    cli = [sys.executable, "-m", "controller.flist.cli"]
    for args in (
        ["ls", str(tmp_path / "junk.fl")],
        ["cat", str(small[0]), "/loop-a"],
        ["cat", str(small[0]), "/d"],
    ):
        done = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert done.returncode == 1
        assert "zmachine-flist: error: flist" in done.stderr
        assert "Traceback" not in done.stderr


def test_errors_are_flist_errors() -> None:
    for cls in (BlockCorruptError, BlockMissingError, FlistLinkError, FlistNameError):
        assert issubclass(cls, FlistError)
