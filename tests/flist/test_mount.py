"""Real FUSE mounts (root + /dev/fuse): round trip, errnos, cache, overlay, lifecycle."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.flist.chunks import CHUNK_SIZE
from controller.flist.errors import FlistMountError
from controller.flist.mount import is_mounted, serve, unmount, wait_mounted
from controller.flist.overlay import mount_overlay, unmount_overlay
from controller.flist.pack import pack
from tests.flist.conftest import Mounted, assert_same_tree, make_tree, needs_fuse, run_cli
from tests.flist.fake_zdb import FakeZdb

pytestmark = [pytest.mark.fuse, needs_fuse(), pytest.mark.timeout(300)]
MountFn = Callable[..., Mounted]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("mounted")
    source = make_tree(base / "src", files=2500, large=(5 * CHUNK_SIZE + 99, CHUNK_SIZE))
    pack(source, base / "tree.fl", [f"dir://{base / 'store'}"])
    return source, base / "tree.fl", base / "store"


def test_mount_round_trip_via_recorded_routes(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    source, flist, _ = packed
    mounted = mount_flist(flist)  # no --store: blocks found through the flist's route table
    assert_same_tree(source, mounted.mountpoint)


def test_errnos_and_kernel_facing_ops(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    root = mount_flist(packed[1]).mountpoint

    def code(call: Callable[[], object]) -> int:
        with pytest.raises(OSError) as info:
            call()
        return info.value.errno or 0

    assert code(lambda: os.stat(root / "nope")) == errno.ENOENT
    assert code(lambda: os.stat(root / "empty" / "x")) == errno.ENOTDIR
    assert code(lambda: os.listdir(root / "empty")) == errno.ENOTDIR
    assert code(lambda: (root / "sub").read_bytes()) == errno.EISDIR
    assert code(lambda: (root / "empty").write_bytes(b"x")) == errno.EROFS
    assert code(lambda: (root / "new").mkdir()) == errno.EROFS
    assert code(lambda: os.unlink(root / "empty")) == errno.EROFS
    assert code(lambda: os.getxattr(root / "empty", "trusted.overlay.opaque")) == errno.ENODATA
    assert os.listxattr(root / "empty") == []
    vfs = os.statvfs(root)
    assert vfs.f_files > 2500 and vfs.f_blocks > 0 and vfs.f_namemax == 255
    assert os.readlink(root / "abs-dir-link") == "/sub/deep"
    # Reads at odd offsets across chunk boundaries.
    with open(root / "large0.bin", "rb") as handle:
        handle.seek(CHUNK_SIZE - 10)
        assert (
            handle.read(CHUNK_SIZE + 20)
            == ((packed[0] / "large0.bin").read_bytes()[CHUNK_SIZE - 10 : 2 * CHUNK_SIZE + 10])
        )


def test_cache_layout_and_shared_downloads(
    packed: tuple[Path, Path, Path], mount_flist: MountFn, tmp_path: Path
) -> None:
    source, flist, _store = packed
    cache = tmp_path / "blockcache"
    root = mount_flist(flist, cache=cache).mountpoint
    expected = (source / "large0.bin").read_bytes()
    results: list[bytes] = []
    readers = [
        threading.Thread(target=lambda: results.append((root / "large0.bin").read_bytes()))
        for _ in range(6)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert results == [expected] * 6
    ids = [
        row[0].hex()
        for row in sqlite3.connect(flist).execute(
            "SELECT id FROM block JOIN inode USING (ino) WHERE name = 'large0.bin' ORDER BY"
            " block.rowid"
        )
    ]
    for index, hexid in enumerate(ids):
        cached = cache / hexid[:2] / hexid[2:4] / hexid
        assert cached.read_bytes() == expected[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
    assert not [p for p in cache.rglob(".tmp-*")]  # atomic writes leave no temp files


def test_missing_and_corrupt_blocks_read_as_eio(tmp_path: Path, mount_flist: MountFn) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "good").write_bytes(b"g" * 1000)
    (source / "gone").write_bytes(os.urandom(CHUNK_SIZE + 5))
    (source / "bad").write_bytes(os.urandom(3000))
    store = tmp_path / "store"
    pack(source, tmp_path / "t.fl", [f"dir://{store}"])
    conn = sqlite3.connect(tmp_path / "t.fl")

    def block_file(name: str, index: int = 0) -> Path:
        rows = conn.execute(
            "SELECT id FROM block JOIN inode USING (ino) WHERE name = ? ORDER BY block.rowid",
            (name,),
        ).fetchall()
        hexid: str = rows[index][0].hex()
        return store / hexid

    block_file("gone", 1).unlink()
    damaged = bytearray(block_file("bad").read_bytes())
    damaged[20] ^= 0xFF
    block_file("bad").write_bytes(bytes(damaged))
    root = mount_flist(tmp_path / "t.fl").mountpoint
    assert (root / "good").read_bytes() == b"g" * 1000
    for name in ("gone", "bad"):
        with pytest.raises(OSError) as info:
            (root / name).read_bytes()
        assert info.value.errno == errno.EIO
    with open(root / "gone", "rb") as handle:  # the intact first chunk is still served
        assert len(handle.read(CHUNK_SIZE)) == CHUNK_SIZE


def test_root_with_another_inode_number(
    packed: tuple[Path, Path, Path], mount_flist: MountFn, tmp_path: Path
) -> None:
    """FUSE wants the root at inode 1; flists from other writers may number it differently."""
    source, flist, _ = packed
    shifted = tmp_path / "shifted.fl"
    shifted.write_bytes(flist.read_bytes())
    conn = sqlite3.connect(shifted)
    conn.executescript(
        "UPDATE inode SET ino = ino + 100000;"
        "UPDATE inode SET parent = parent + 100000 WHERE parent != 0;"
        "UPDATE extra SET ino = ino + 100000; UPDATE block SET ino = ino + 100000;"
        "UPDATE zm_hardlink SET ino = ino + 100000, target = target + 100000;"
        "UPDATE inode SET ino = 1 WHERE name = 'empty';"  # inode 1 is now an ordinary file
    )
    conn.close()
    assert_same_tree(source, mount_flist(shifted).mountpoint)


def test_mount_from_zdb(tmp_path: Path, mount_flist: MountFn, fake_zdb: FakeZdb) -> None:
    source = make_tree(tmp_path / "src", files=200, large=(2 * CHUNK_SIZE + 3,))
    pack(source, tmp_path / "z.fl", [f"zdb://127.0.0.1:{fake_zdb.port}"])
    assert_same_tree(source, mount_flist(tmp_path / "z.fl").mountpoint)
    assert fake_zdb.commands["GET"] > 0


def test_bad_rows_fail_alone(
    packed: tuple[Path, Path, Path], mount_flist: MountFn, tmp_path: Path
) -> None:
    """A corrupt entry is an EIO for whoever touches it; the mount keeps serving the rest."""
    broken = tmp_path / "broken.fl"
    broken.write_bytes(packed[1].read_bytes())
    conn = sqlite3.connect(broken)
    conn.execute("UPDATE inode SET mode = 511 WHERE name = 'rel-link'")  # 0o777: no type bits
    conn.commit()
    conn.close()
    mounted = mount_flist(broken)
    with pytest.raises(OSError) as info:
        os.listdir(mounted.mountpoint / "sub")
    assert info.value.errno == errno.EIO
    assert (mounted.mountpoint / "sub" / "deep" / "data").read_bytes().startswith(b"deep data")
    assert (mounted.mountpoint / "large1.bin").stat().st_size == CHUNK_SIZE
    assert mounted.process.poll() is None


def test_size_beyond_the_blocks_reads_what_the_blocks_hold(
    packed: tuple[Path, Path, Path], mount_flist: MountFn, tmp_path: Path
) -> None:
    source = packed[0]
    odd = tmp_path / "odd.fl"
    odd.write_bytes(packed[1].read_bytes())
    conn = sqlite3.connect(odd)
    conn.execute("UPDATE inode SET size = size * 3 WHERE name = 'large1.bin'")
    conn.commit()
    conn.close()
    mounted = mount_flist(odd)
    data = (mounted.mountpoint / "large1.bin").read_bytes()  # no EIO: what rfs serves too
    assert data == (source / "large1.bin").read_bytes()


def test_colliding_undecodable_names_are_served_like_rfs(
    mount_flist: MountFn, tmp_path: Path
) -> None:
    """Names that are not UTF-8 are stored lossily; two that collide must not make the flist
    unreadable. The first (in pack order) is served under the lossy name, as rfs's lookup does."""
    source = tmp_path / "src"
    source.mkdir()
    (source / os.fsdecode(b"a\xfe")).write_bytes(b"first")
    (source / os.fsdecode(b"a\xff")).write_bytes(b"second")
    (source / os.fsdecode(b"d\xfe")).mkdir()
    (source / os.fsdecode(b"d\xfe") / "inside").write_bytes(b"in the dir")
    (source / os.fsdecode(b"d\xff")).write_bytes(b"a file")
    (source / "plain").write_bytes(b"plain")
    pack(source, tmp_path / "t.fl", [f"dir://{tmp_path / 'store'}"])
    listing = run_cli("ls", "-R", str(tmp_path / "t.fl")).stdout.splitlines()
    assert listing == ["/", "/a\ufffd", "/d\ufffd", "/plain", "/d\ufffd/inside"]
    assert (
        run_cli("cat", str(tmp_path / "t.fl"), "/a\ufffd", "--cache", str(tmp_path / "c")).stdout
        == "first"
    )
    run_cli("unpack", str(tmp_path / "t.fl"), str(tmp_path / "out"), "--cache", str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path / "out")) == ["a\ufffd", "d\ufffd", "plain"]
    mounted = mount_flist(tmp_path / "t.fl")
    assert sorted(os.listdir(mounted.mountpoint)) == ["a\ufffd", "d\ufffd", "plain"]
    assert (mounted.mountpoint / "a\ufffd").read_bytes() == b"first"
    assert (mounted.mountpoint / "d\ufffd" / "inside").read_bytes() == b"in the dir"
    with pytest.raises(FileNotFoundError):  # the raw name was never stored
        (mounted.mountpoint / os.fsdecode(b"a\xfe")).stat()


def test_overlay_gives_a_writable_root(
    packed: tuple[Path, Path, Path], mount_flist: MountFn, tmp_path: Path
) -> None:
    lower = mount_flist(packed[1]).mountpoint
    target = tmp_path / "root"
    mount_overlay(lower, tmp_path / "vol" / "rw", tmp_path / "vol" / "wd", target)
    try:
        (target / "sub" / "deep" / "data").write_bytes(b"changed")
        (target / "newdir").mkdir()
        os.unlink(target / "empty")
        assert (target / "sub" / "deep" / "data").read_bytes() == b"changed"
        assert not (target / "empty").exists()
        assert (lower / "empty").exists()  # the flist itself is untouched
        assert (tmp_path / "vol" / "rw" / "newdir").is_dir()
    finally:
        unmount_overlay(target)
    unmount_overlay(target)  # idempotent
    assert not is_mounted(target)


def test_sigterm_and_unmount_end_the_server(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    first = mount_flist(packed[1])
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=20) == 0
    assert not is_mounted(first.mountpoint)
    second = mount_flist(packed[1])
    unmount(second.mountpoint)
    unmount(second.mountpoint)  # idempotent
    assert second.process.wait(timeout=20) == 0


def test_unmount_cleans_up_after_a_killed_server(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    dead = mount_flist(packed[1])
    dead.process.kill()
    dead.process.wait(timeout=20)
    assert is_mounted(dead.mountpoint)
    with pytest.raises(OSError) as info:
        os.listdir(dead.mountpoint)
    assert info.value.errno == errno.ENOTCONN
    unmount(dead.mountpoint)
    assert not is_mounted(dead.mountpoint)
    assert os.listdir(dead.mountpoint) == []


def test_a_frozen_server_does_not_block_the_mount_check(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    """The agent asks "is it mounted?" of FUSE mounts whose server may hang: the answer
    comes from the kernel's mount, never from the server."""
    frozen = mount_flist(packed[1])
    os.listdir(frozen.mountpoint)  # attributes cached, as on any mount in use
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(is_mounted, frozen.mountpoint).result(timeout=5)
    finally:
        frozen.process.send_signal(signal.SIGCONT)


def test_mount_refuses_a_mountpoint_in_use(
    packed: tuple[Path, Path, Path], mount_flist: MountFn
) -> None:
    mounted = mount_flist(packed[1])
    with pytest.raises(FlistMountError, match="already a mount point"):
        serve(packed[1], mounted.mountpoint, None)


def test_wait_mounted_times_out(tmp_path: Path) -> None:
    with pytest.raises(FlistMountError, match="not mounted"):
        wait_mounted(tmp_path, timeout=0.2)
