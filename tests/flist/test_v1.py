"""v1 ``.flist`` reading: XXTEA vector, capnp decoding against the real compiler, full trees."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.flist import xxtea
from controller.flist.cache import BlockCache
from controller.flist.capnp import Message
from controller.flist.chunks import CHUNK_SIZE, decode, encode_v1
from controller.flist.meta import open_flist
from controller.flist.stores import DirStore, Router
from controller.flist.unpack import unpack
from controller.flist.v1 import dir_key
from tests.flist.conftest import Mounted, assert_same_tree, needs_fuse, run_cli
from tests.flist.fake_zdb import FakeZdb
from tests.flist.v1_builder import CAPNP, build_v1, encode

needs_capnp = pytest.mark.skipif(CAPNP is None, reason="capnp (Debian capnproto) not installed")


NATIVE = xxtea._native


@pytest.fixture(params=["python", "native"])
def cipher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the pure-Python cipher and, if installed, the C one."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("the xxtea package is not installed")
    monkeypatch.setattr(xxtea, "_native", NATIVE if request.param == "native" else None)
    return str(request.param)


def test_xxtea_reference_vector(cipher: str) -> None:
    ciphertext = xxtea.encrypt(b"hello world", bytes(range(16)))
    assert ciphertext.hex() == "5120f975e103d11a5f7b6667565c5487"
    assert xxtea.decrypt(ciphertext, bytes(range(16))) == b"hello world"
    with pytest.raises(xxtea.XXTEAError):
        xxtea.decrypt(ciphertext, bytes(16))


@pytest.mark.skipif(NATIVE is None, reason="the xxtea package is not installed")
def test_xxtea_implementations_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(16)
    for size in (1, 7, 8, 1000, 65537):
        data = os.urandom(size)
        fast = xxtea.encrypt(data, key)
        monkeypatch.setattr(xxtea, "_native", None)
        assert xxtea.encrypt(data, key) == fast
        assert xxtea.decrypt(fast, key) == data
        monkeypatch.setattr(xxtea, "_native", NATIVE)


def test_v1_chunk_codec_round_trip() -> None:
    plain = os.urandom(1000)
    ref, stored = encode_v1(plain)
    assert len(ref.id) == len(ref.key) == 16
    assert decode(stored, ref) == plain


def test_root_key_is_blake2b_128_of_empty_path() -> None:
    assert dir_key("") == "cae66941d9efbd404e4d88758ea67670"


@needs_capnp
def test_capnp_layout_matches_the_compiler() -> None:
    raw = encode(
        "Inode",
        '(name = "x", size = 77, attributes = (link = (target = "t")), aclkey = "a",'
        " modificationTime = 11, creationTime = 22)",
    )
    node = Message(raw).root()
    assert node.text(0) == "x" and node.uint64(0) == 77 and node.uint16(4) == 2
    assert node.uint32(3) == 11 and node.uint32(4) == 22 and node.text(2) == "a"
    link = node.struct(1)
    assert link is not None and link.text(0) == "t"
    aci = Message(encode("ACI", '(uname = "u", mode = 420, uid = 5)')).root()
    assert aci.uint16(0) == 420 and aci.int64(1, -1) == 5 and aci.int64(2, -1) == -1


def make_v1_tree(root: Path) -> Path:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("zmachine\n")
    (root / "etc" / "shadow").write_text("root:*:\n")
    os.chmod(root / "etc" / "shadow", 0o640)
    os.chown(root / "etc" / "shadow", 0, 42)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "big.so").write_bytes(os.urandom(CHUNK_SIZE + 4321))
    (root / "empty").touch()
    os.symlink("usr/lib/big.so", root / "link")
    os.symlink("/etc", root / "etc-link")
    os.mkfifo(root / "fifo")
    os.mknod(root / "tty", 0o620 | stat.S_IFCHR, os.makedev(5, 0))
    (root / "home").mkdir(mode=0o750)
    os.chown(root / "home", 1000, 1000)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (1_600_000_000, 1_600_000_123), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def v1_flist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if CAPNP is None:
        pytest.skip("capnp (Debian capnproto) not installed")
    base = tmp_path_factory.mktemp("v1")
    source = make_v1_tree(base / "src")
    store = base / "store"
    flist = build_v1(source, base / "image.flist", DirStore(f"dir://{store}"))
    return source, flist, store


def test_v1_unpack_is_exact(v1_flist: tuple[Path, Path, Path], tmp_path: Path) -> None:
    source, flist_path, store = v1_flist
    with open_flist(flist_path) as flist:
        assert flist.version == 1
        cache = BlockCache(Router.from_specs([f"dir://{store}"]), tmp_path / "c", flist.label)
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")


def test_v1_metadata_reads(v1_flist: tuple[Path, Path, Path]) -> None:
    with open_flist(v1_flist[1]) as flist:
        real, entry = flist.resolve("/etc-link/shadow")
        assert real == "/etc/shadow"
        assert (entry.uid, entry.gid, stat.S_IMODE(entry.mode)) == (0, 42, 0o640)
        assert len(flist.blocks(flist.resolve("/link")[1])) == 2


@needs_capnp
def test_v1_backend_metadata_names_the_zdb(fake_zdb: FakeZdb, tmp_path: Path) -> None:
    from controller.flist.stores import ZdbStore

    source = make_v1_tree(tmp_path / "src")
    fake_zdb.add_namespace("hub")
    backend = {"host": "127.0.0.1", "port": fake_zdb.port, "namespace": "hub"}
    store = ZdbStore(f"zdb://127.0.0.1:{fake_zdb.port}/hub")
    flist_path = build_v1(source, tmp_path / "x.flist", store, backend, unknown_owner="hostname")
    with open_flist(flist_path) as flist:
        assert flist.store_specs() == [f"zdb://127.0.0.1:{fake_zdb.port}/hub"]
        entry = flist.resolve("/etc/hostname")[1]
        assert entry.uid == 0  # ACI uid -1: resolved from the user name "root"
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        assert cache.read(flist.blocks(entry), entry.size, 0, 100) == b"zmachine\n"
        cache.close()


@needs_capnp
def test_v1_without_backend_reads_from_the_hub_store(fake_zdb: FakeZdb, tmp_path: Path) -> None:
    """rfs v1 falls back to the hub's store when the flist names none; the hub is ours here."""
    from controller.flist.stores import ZdbStore

    source = make_v1_tree(tmp_path / "src")
    hub = f"zdb://127.0.0.1:{fake_zdb.port}"
    flist_path = build_v1(source, tmp_path / "x.flist", ZdbStore(hub))  # no metadata.backend
    with open_flist(flist_path) as flist:
        assert flist.store_specs() == ["zdb://hub.threefold.me:9900"]
    cat = ["cat", str(flist_path), "/etc/hostname", "--cache", str(tmp_path / "c")]
    assert run_cli(*cat, env={"ZMACHINE_FLIST_V1_STORE": hub}).stdout == "zmachine\n"
    assert fake_zdb.commands["GET"] == 1


@needs_capnp
def test_v1_special_entry_of_unknown_type_is_skipped(tmp_path: Path) -> None:
    source = make_v1_tree(tmp_path / "src")
    store = DirStore(f"dir://{tmp_path / 'store'}")
    flist_path = build_v1(source, tmp_path / "x.flist", store, unknown_special="fifo")
    with open_flist(flist_path) as flist:
        names = {path for path, _ in flist.walk()}
        cache = BlockCache(Router.from_specs([store.url]), None, flist.label)
        unpack(flist, cache, tmp_path / "out")
    assert "/fifo" not in names and "/tty" in names
    (source / "fifo").unlink()
    os.utime(source, (1_600_000_000, 1_600_000_123))  # as make_v1_tree left it
    assert_same_tree(source, tmp_path / "out")


@pytest.mark.fuse
@needs_fuse()
def test_v1_mount_round_trip(
    v1_flist: tuple[Path, Path, Path], mount_flist: Callable[..., Mounted]
) -> None:
    source, flist, store = v1_flist
    mounted = mount_flist(flist, stores=(f"dir://{store}",))
    assert_same_tree(source, mounted.mountpoint)


def test_v1_cli(v1_flist: tuple[Path, Path, Path], tmp_path: Path) -> None:
    source, flist, store = v1_flist
    cli = [sys.executable, "-m", "controller.flist.cli"]
    stores = ["--store", f"dir://{store}", "--cache", str(tmp_path / "c")]
    inspect = subprocess.run([*cli, "inspect", str(flist)], capture_output=True, text=True)
    assert "v1 (0-fs .flist)" in inspect.stdout, inspect.stderr
    listing = subprocess.run(
        [*cli, "ls", "-l", str(flist), "/etc"], capture_output=True, text=True, check=True
    ).stdout
    assert "-rw-r-----     0    42" in listing and "/etc/shadow" in listing
    cat = subprocess.run(
        [*cli, "cat", str(flist), "/link", *stores], capture_output=True, check=True
    )
    assert cat.stdout == (source / "usr/lib/big.so").read_bytes()
    subprocess.run(
        [*cli, "unpack", str(flist), str(tmp_path / "out"), *stores],
        check=True,
        capture_output=True,
    )
    assert_same_tree(source, tmp_path / "out")
