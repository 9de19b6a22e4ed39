"""``pack`` from a root filesystem tar and from container images (OCI layout, OCI archive,
``docker save`` archive): members read straight from the archive, layers and whiteouts applied,
the image's run settings kept in tags and in /.startup.toml."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from controller.flist.archive import pack_source
from controller.flist.cache import BlockCache
from controller.flist.errors import FlistFormatError
from controller.flist.meta import open_flist
from controller.flist.stores import Router
from controller.flist.unpack import unpack
from tests.flist.conftest import MTIME, assert_same_tree, make_tree, run_cli


def _unpack(flist_path: Path, store: Path, target: Path) -> dict[str, str]:
    with open_flist(flist_path) as flist:
        cache = BlockCache(Router.from_specs([f"dir://{store}"]), None, flist.label)
        unpack(flist, cache, target)
        cache.close()
        return flist.tags()


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
def test_rootfs_tar_round_trip(tmp_path: Path, compression: str) -> None:
    source = make_tree(tmp_path / "src", files=60, large=(700_000,))
    (source / "socket").unlink()  # tar has no sockets
    os.utime(source, (MTIME, MTIME))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(source, arcname=".")
    data = raw.getvalue()
    if compression == "gz":
        data = gzip.compress(data)
    elif compression == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    archive = tmp_path / f"rootfs.tar{'.' + compression if compression else ''}"
    archive.write_bytes(data)
    stats, image = pack_source(archive, tmp_path / "t.fl", [f"dir://{tmp_path / 'store'}"])
    assert image is None and stats.hardlinks == 1
    tags = _unpack(tmp_path / "t.fl", tmp_path / "store", tmp_path / "out")
    assert tags == {}
    assert_same_tree(source, tmp_path / "out")


def _layer(entries: Sequence[tuple[str, bytes | None]], compress: bool = False) -> bytes:
    """A layer tar: (name, content) with None for a directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode, info.uid = len(content), 0o644, 1000
                tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


LOWER = [
    ("etc", None),
    ("etc/a", b"a from lower"),
    ("etc/b", b"b from lower"),
    ("dir", None),
    ("dir/x", b"x"),
    ("dir/sub", None),
    ("dir/sub/y", b"y"),
    ("replaced", b"a file, then a directory"),
]
UPPER = [
    ("etc/.wh.a", b""),
    ("etc/c", b"c from upper"),
    ("dir/z", b"z from upper"),  # before the opaque marker, and kept
    ("dir/.wh..wh..opq", b""),
    ("replaced/inside", b"now a directory"),
    ("etc/b", b"b from upper"),
]
CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": ["/usr/bin/server", "--flag"],
        "Cmd": ["arg with space"],
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hello=world"],
        "WorkingDir": "/srv",
    },
    "rootfs": {"type": "layers", "diff_ids": []},
}
EXPECTED = {
    "/etc/b": b"b from upper",
    "/etc/c": b"c from upper",
    "/dir/z": b"z from upper",
    "/replaced/inside": b"now a directory",
}


def _oci_layout(root: Path, gzip_layers: bool) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layers = [blob(_layer(LOWER, gzip_layers)), blob(_layer(UPPER, gzip_layers))]
    manifest = {"schemaVersion": 2, "config": blob(json.dumps(CONFIG).encode()), "layers": layers}
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode())]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _docker_save(path: Path) -> None:
    files = {
        "lower/layer.tar": _layer(LOWER),
        "upper/layer.tar": _layer(UPPER),
        "config.json": json.dumps(CONFIG).encode(),
        "manifest.json": json.dumps(
            [
                {
                    "Config": "config.json",
                    "RepoTags": ["t:1"],
                    "Layers": ["lower/layer.tar", "upper/layer.tar"],
                }
            ]
        ).encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tar_dir(directory: Path, path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for child in sorted(directory.iterdir()):
            tar.add(child, arcname=child.name)


@pytest.mark.parametrize("kind", ["oci-dir", "oci-archive", "docker-save"])
def test_image_layers_whiteouts_and_settings(tmp_path: Path, kind: str) -> None:
    if kind == "docker-save":
        source = tmp_path / "image.tar"
        _docker_save(source)
    else:
        _oci_layout(tmp_path / "oci", gzip_layers=kind == "oci-archive")
        source = tmp_path / "oci"
        if kind == "oci-archive":
            source = tmp_path / "oci.tar"
            _tar_dir(tmp_path / "oci", source)
    store = tmp_path / "store"
    out = run_cli("pack", str(source), "-o", str(tmp_path / "t.fl"), "-s", f"dir://{store}", "-q")
    assert "tag: entrypoint=/usr/bin/server --flag 'arg with space'" in out.stdout
    tags = _unpack(tmp_path / "t.fl", store, tmp_path / "out")
    assert tags == {
        "entrypoint": "/usr/bin/server --flag 'arg with space'",
        "env": json.dumps({"GREETING": "hello=world", "PATH": "/usr/bin:/bin"}),
        "workdir": "/srv",
    }
    files = {
        "/" + str(p.relative_to(tmp_path / "out")): p.read_bytes()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    startup = files.pop("/.startup.toml").decode()
    assert files == EXPECTED  # a hidden, x and sub/y gone (opaque), b replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".startup.toml",
        "dir",
        "etc",
        "replaced",
    ]
    assert (tmp_path / "out" / "etc" / "c").stat().st_uid == 1000
    assert 'name = "/usr/bin/server"' in startup and 'dir = "/srv"' in startup
    assert 'args = ["--flag", "arg with space"]' in startup
    assert '"GREETING" = "hello=world"' in startup


def test_bad_archives_are_refused_by_name(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(FlistFormatError, match=r"evil.tar, path ../outside: .*climbs out"):
        pack_source(evil, tmp_path / "t.fl", [f"dir://{tmp_path / 's'}"])
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(FlistFormatError, match=r"junk\.tar\.gz: bad tar archive"):
        pack_source(junk, tmp_path / "t.fl", [f"dir://{tmp_path / 's'}"])
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        data = b'[{"Config": "missing.json", "Layers": []}]'
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(FlistFormatError, match=r"path missing\.json: image file missing"):
        pack_source(broken, tmp_path / "t.fl", [f"dir://{tmp_path / 's'}"])
    assert not (tmp_path / "t.fl").exists()  # never a half-written flist
