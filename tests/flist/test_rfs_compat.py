"""rfs v2.0.6 (what zos runs) reads what we pack into a dir:// store: unpack and mount.
Opt-in: needs ``rfs`` on PATH (built from github.com/threefoldtech/rfs at v2.0.6)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from controller.flist.archive import pack_source
from controller.flist.chunks import CHUNK_SIZE
from controller.flist.mount import is_mounted, unmount
from controller.flist.pack import pack
from controller.flist.stores import migrate_dir_store
from tests.flist.conftest import needs_fuse

RFS = shutil.which("rfs")
pytestmark = pytest.mark.skipif(
    RFS is None, reason="rfs (v2.0.6, built from github.com/threefoldtech/rfs) is not on PATH"
)


def _tree(root: Path) -> Path:
    """What rfs keeps as we do: files of 0, small and several-chunk sizes, modes, dirs, relative
    symlinks (rfs rewrites absolute ones and has no hard links)."""
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "empty").touch()
    (root / "etc" / "os-release").write_bytes(b'NAME="zmachine"\n')
    (root / "etc" / "deep" / "big.bin").write_bytes(os.urandom(3 * CHUNK_SIZE + 12345))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "etc" / "secret").write_bytes(b"x")
    (root / "etc" / "secret").chmod(0o600)
    os.symlink("etc/os-release", root / "release-link")
    return root


def _view(root: Path) -> dict[str, tuple[object, ...]]:
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            result[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return result


def _rfs(*args: str) -> subprocess.CompletedProcess[str]:
    assert RFS is not None
    return subprocess.run([RFS, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("input_kind", ["directory", "tar.gz"])
def test_rfs_unpacks_what_we_pack(tmp_path: Path, input_kind: str) -> None:
    source = _tree(tmp_path / "src")
    store = tmp_path / "store"
    packed_from = source
    if input_kind == "tar.gz":
        packed_from = tmp_path / "rootfs.tar.gz"
        with tarfile.open(packed_from, "w:gz") as tar:
            tar.add(source, arcname=".")
    pack_source(packed_from, tmp_path / "t.fl", [f"dir://{store}"])
    done = _rfs(
        "unpack", "-m", str(tmp_path / "t.fl"), "-c", str(tmp_path / "c"), str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    assert _view(tmp_path / "out") == _view(source)


def test_rfs_reads_an_old_nested_store_only_after_migrate_store(tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    store = tmp_path / "store"
    pack(source, tmp_path / "t.fl", [f"dir://{store}"])
    for block in list(store.iterdir()):  # the layout our earlier releases wrote
        (store / block.name[:2]).mkdir(exist_ok=True)
        block.rename(store / block.name[:2] / block.name)
    meta = ["-m", str(tmp_path / "t.fl")]
    refused = _rfs("unpack", *meta, "-c", str(tmp_path / "c1"), str(tmp_path / "out1"))
    assert refused.returncode != 0 and "KeyNotFound" in refused.stdout + refused.stderr
    migrate_dir_store(store)
    done = _rfs("unpack", *meta, "-c", str(tmp_path / "c2"), str(tmp_path / "out2"))
    assert done.returncode == 0, done.stderr
    assert _view(tmp_path / "out2") == _view(source)


@pytest.mark.fuse
@needs_fuse()
def test_rfs_mounts_what_we_pack(tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    pack(source, tmp_path / "t.fl", [f"dir://{tmp_path / 'store'}"])
    target = tmp_path / "mnt"
    target.mkdir()
    assert RFS is not None
    argv = [RFS, "mount", "-m", str(tmp_path / "t.fl"), "-c", str(tmp_path / "c"), str(target)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(target):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "rfs did not mount within 60 s"
            time.sleep(0.2)
        assert _view(target) == _view(source)
    finally:
        unmount(target)
        process.wait(timeout=30)
