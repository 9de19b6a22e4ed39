"""Stores: dir, http (local http.server), zdb (fake_zdb, see its docstring), and the router."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.flist.cache import BlockCache
from controller.flist.chunks import CHUNK_SIZE, encode_v2
from controller.flist.errors import BlockMissingError, StoreError
from controller.flist.meta import open_flist
from controller.flist.pack import pack
from controller.flist.stores import DirStore, Router, ZdbStore, parse_spec, strip_password
from controller.flist.unpack import unpack
from tests.flist.conftest import assert_same_tree, make_tree, run_cli
from tests.flist.fake_zdb import FakeZdb

HttpDir = Callable[[Path], tuple[str, list[str]]]


def test_strip_password_keeps_user_and_port() -> None:
    assert strip_password("zdb://user:secret@host:9900/ns") == "zdb://user@host:9900/ns"
    assert strip_password("zdb://:secret@[::1]:9900/ns") == "zdb://[::1]:9900/ns"
    assert strip_password("dir:///x") == "dir:///x"


def test_parse_spec() -> None:
    assert parse_spec("dir:///a") == (0, 255, "dir:///a")
    assert parse_spec("00-7F=zdb://h") == (0, 127, "zdb://h")
    with pytest.raises(StoreError):
        parse_spec("80-10=dir:///a")
    with pytest.raises(StoreError, match="unsupported store scheme"):
        Router.from_specs(["ftp://x"])


def test_dir_store_writes_flat_and_reads_both_layouts(tmp_path: Path) -> None:
    store = DirStore(f"dir://{tmp_path}")
    ref, stored = encode_v2(b"x" * 100)
    store.set(ref.id, stored)
    assert (tmp_path / ref.id.hex()).read_bytes() == stored  # what rfs v2.0.6 reads
    assert [p.name for p in tmp_path.iterdir()] == [ref.id.hex()]
    nested_ref, nested = encode_v2(b"nested")
    (tmp_path / nested_ref.id.hex()[:2]).mkdir()
    (tmp_path / nested_ref.id.hex()[:2] / nested_ref.id.hex()).write_bytes(nested)
    assert store.get(nested_ref.id) == nested and store.exists(nested_ref.id)
    with pytest.raises(StoreError):
        DirStore("dir://relative/path")


def test_migrate_store_moves_nested_blocks_and_keeps_readers_working(
    tmp_path: Path,
) -> None:
    source = make_tree(tmp_path / "src", files=30, large=(CHUNK_SIZE * 3 + 7,))
    store = tmp_path / "store"
    pack(source, tmp_path / "t.fl", [f"dir://{store}"])
    # Recreate a store in the old layout, plus a duplicate, a stray file and a v1-sized id.
    blocks = sorted(store.iterdir())
    for block in blocks:
        (store / block.name[:2]).mkdir(exist_ok=True)
        block.rename(store / block.name[:2] / block.name)
    (store / blocks[0].name).write_bytes((store / blocks[0].name[:2] / blocks[0].name).read_bytes())
    stray = store / blocks[1].name[:2] / "notes.txt"
    stray.write_text("not a block")
    v1_id = "ab" * 16
    (store / "ab").mkdir(exist_ok=True)
    (store / "ab" / v1_id).write_bytes(b"v1")
    with open_flist(tmp_path / "t.fl") as flist:  # the old layout still reads
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "before")
        cache.close()
    assert_same_tree(source, tmp_path / "before")

    out = run_cli("migrate-store", f"dir://{store}").stdout
    assert out == (  # every block but the duplicate, plus the v1 one
        f"dir://{store}: {len(blocks)} blocks moved to the flat layout, 1 duplicates removed,"
        " 1 other files left in place\n"
    )
    assert stray.exists() and (store / v1_id).read_bytes() == b"v1"
    remaining = {p.name for p in store.iterdir() if p.is_dir()}
    assert remaining == {blocks[1].name[:2]}  # only the directory holding the stray file
    assert {b.name for b in blocks} <= {p.name for p in store.iterdir()}
    with open_flist(tmp_path / "t.fl") as flist:
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "after")
        cache.close()
    assert_same_tree(source, tmp_path / "after")
    again = run_cli("migrate-store", f"dir://{store}").stdout
    assert again.startswith(f"dir://{store}: 0 blocks moved")
    refused = run_cli("migrate-store", "zdb://localhost:1", check=False)
    assert refused.returncode == 1 and "only dir:// stores" in refused.stderr


def test_router_replicates_and_reads_first_that_answers(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    router = Router.from_specs([f"dir://{a}", f"dir://{b}"])
    ref, stored = encode_v2(os.urandom(1000))
    assert router.put(ref.id, stored) == 2
    assert router.put(ref.id, stored) == 0  # already present: not written again
    (a / ref.id.hex()).unlink()
    assert router.get(ref.id) == stored  # a misses, b answers
    (b / ref.id.hex()).unlink()
    with pytest.raises(BlockMissingError, match="not found"):
        router.get(ref.id, "/some/file")


def test_http_store_serves_a_dir_store(tmp_path: Path, http_dir: HttpDir) -> None:
    source = make_tree(tmp_path / "src", files=40, large=(CHUNK_SIZE * 2 + 1,))
    store = tmp_path / "store"
    pack(source, tmp_path / "t.fl", [f"dir://{store}"])
    url, requests = http_dir(store)
    with open_flist(tmp_path / "t.fl") as flist:
        cache = BlockCache(Router.from_specs([url]), tmp_path / "cache", flist.label)
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")
    assert requests and all(r.count("/") == 1 for r in requests)  # flat: one GET per block
    blocks = len(requests)
    for block in list(store.iterdir()):  # a server in front of an old, nested store
        (store / block.name[:2]).mkdir(exist_ok=True)
        block.rename(store / block.name[:2] / block.name)
    with open_flist(tmp_path / "t.fl") as flist:
        cache = BlockCache(Router.from_specs([url]), None, flist.label)
        unpack(flist, cache, tmp_path / "nested")
        cache.close()
    assert_same_tree(source, tmp_path / "nested")
    assert len(requests) == 3 * blocks  # flat 404, then /hh/hex


def test_http_store_is_read_only_and_reports_errors(http_dir: HttpDir, tmp_path: Path) -> None:
    url, _ = http_dir(tmp_path)
    router = Router.from_specs([url])
    with pytest.raises(StoreError, match="read-only"):
        router.routes[0].store.set(b"\0" * 32, b"x")
    with pytest.raises(BlockMissingError):
        router.get(b"\1" * 32)
    with pytest.raises(BlockMissingError, match=r"127\.0\.0\.1:1"):
        Router.from_specs(["http://127.0.0.1:1"]).get(b"\1" * 32)


def test_zdb_store_round_trip_with_namespace(fake_zdb: FakeZdb, tmp_path: Path) -> None:
    fake_zdb.add_namespace("flists", password="s3cret")
    source = make_tree(tmp_path / "src", files=50, large=(CHUNK_SIZE + 1,))
    url = f"zdb://:s3cret@127.0.0.1:{fake_zdb.port}/flists"
    first = pack(source, tmp_path / "t.fl", [url])
    assert first.blocks_written == len(fake_zdb.data["flists"]) > 0
    assert all(len(key) == 32 for key in fake_zdb.data["flists"])  # raw binary ids
    sets = fake_zdb.commands["SET"]
    again = pack(source, tmp_path / "t2.fl", [url])
    assert again.blocks_written == 0 and fake_zdb.commands["SET"] == sets  # EXISTS first
    with open_flist(tmp_path / "t.fl") as flist:
        assert flist.store_specs() == [f"00-ff=zdb://127.0.0.1:{fake_zdb.port}/flists"]
        # The public namespace is readable without the (stripped) password.
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")


def test_zdb_store_reconnects_after_server_drops(fake_zdb: FakeZdb) -> None:
    store = ZdbStore(f"zdb://127.0.0.1:{fake_zdb.port}")
    store.set(b"k" * 32, b"value")
    fake_zdb.drop_clients()  # the pooled connection is now dead
    assert store.get(b"k" * 32) == b"value"
    store.close()


def test_zdb_store_errors(fake_zdb: FakeZdb) -> None:
    fake_zdb.add_namespace("locked", password="pw")
    reader = ZdbStore(f"zdb://127.0.0.1:{fake_zdb.port}/locked")
    with pytest.raises(StoreError, match="protected"):
        reader.set(b"k" * 32, b"v")
    with pytest.raises(StoreError, match="Namespace not found"):
        ZdbStore(f"zdb://127.0.0.1:{fake_zdb.port}/nope").get(b"k" * 32)
    with pytest.raises(StoreError, match="cannot connect"):
        ZdbStore("zdb://127.0.0.1:1").get(b"k" * 32)
