"""``pack`` from archives: a root filesystem tar (``.tar``, ``.tar.gz``, ``.tar.zst``) or a
container image (an OCI layout directory, an OCI archive or a ``docker save`` archive).

Members are read straight from the archive, so owners, devices and modes survive without root.
Image layers are applied in order with their whiteouts (``.wh.NAME`` hides NAME of the layers
below, ``.wh..wh..opq`` hides everything below in its directory). The image's entrypoint, command,
env and working directory become flist tags (``entrypoint``, ``env``, ``workdir``) and, as rfs's
docker conversion writes, a ``/.startup.toml`` for zos.

Two passes over each layer: the first builds the final tree from the member headers, the second
reads the content of the files that survived, so no member is held in memory or on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
import zstandard

from controller.flist.errors import FlistError, FlistFormatError
from controller.flist.pack import Packer, PackStats, pack, pack_with

log = structlog.get_logger(__name__)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
STARTUP = ".startup.toml"
_KINDS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}
Opener = Callable[[], IO[bytes]]


@dataclass
class _Node:
    info: tarfile.TarInfo | None  # None: a directory only implied by its members' paths
    layer: int
    ordinal: int  # the member's index in its layer, to find its content in the second pass
    children: dict[str, _Node] | None = None  # set for directories

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Image:
    """What an image tells about running it, as tags for the flist."""

    entrypoint: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""

    def tags(self) -> dict[str, str]:
        tags = {"env": json.dumps(self.env, sort_keys=True)}
        if self.entrypoint:
            tags["entrypoint"] = shlex.join(self.entrypoint)
        if self.workdir:
            tags["workdir"] = self.workdir
        return tags

    def startup_toml(self) -> bytes:
        """``/.startup.toml`` as rfs's docker conversion writes it (zos's container entry)."""
        argv = self.entrypoint or ["/bin/sh"]
        env = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in sorted(self.env.items()))
        return (
            '[startup.entry]\nname = "core.system"\n\n[startup.entry.args]\n'
            f"args = {json.dumps(argv[1:])}\ndir = {json.dumps(self.workdir or '/')}\n"
            f"name = {json.dumps(argv[0])}\n\n[startup.entry.args.env]\n{env}"
        ).encode()


@contextlib.contextmanager
def _tar_stream(opener: Opener, label: str) -> Iterator[tarfile.TarFile]:
    """A layer or rootfs tar in stream mode, decompressed by its magic (gzip, zstd or none)."""
    raw = opener()
    try:
        head = raw.read(4)
        raw.seek(0)
        if head.startswith(ZSTD_MAGIC):
            stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw)
            mode = "r|"
        else:
            stream, mode = raw, "r|gz" if head.startswith(GZIP_MAGIC) else "r|"
        with tarfile.open(fileobj=stream, mode=mode) as tar:  # type: ignore[call-overload]
            yield tar
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise FlistFormatError(f"bad tar archive: {exc}", flist=label) from None
    finally:
        raw.close()


def _parts(name: str, label: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FlistFormatError("archive member climbs out of the root", flist=label, path=name)
    return parts


def _hide_lower(directory: _Node, layer: int) -> None:
    """An opaque whiteout: entries of lower layers disappear, this layer's stay."""
    assert directory.children is not None
    for name, child in list(directory.children.items()):
        if child.layer < layer:
            del directory.children[name]
        elif child.is_dir:
            _hide_lower(child, layer)


class _Tree:
    def __init__(self, label: str) -> None:
        self.label = label
        self.root = _Node(None, 0, -1, {})
        self.top_names: set[str] = set()  # to tell an image archive from a root filesystem

    def _directory(self, parts: list[str], layer: int) -> _Node:
        node = self.root
        for part in parts:
            assert node.children is not None
            child = node.children.get(part)
            if child is None or not child.is_dir:  # a later layer may turn a file into a dir
                child = node.children[part] = _Node(None, layer, -1, {})
            node = child
        return node

    def apply(self, tar: tarfile.TarFile, layer: int) -> None:
        for ordinal, member in enumerate(tar):
            parts = _parts(member.name, self.label)
            if len(parts) == 1:
                self.top_names.add(parts[0])
            if not parts:
                if member.isdir():
                    self.root.info = member
                continue
            parent = self._directory(parts[:-1], layer)
            assert parent.children is not None
            name = parts[-1]
            if name == OPAQUE:
                _hide_lower(parent, layer)
            elif name.startswith(WHITEOUT):
                parent.children.pop(name[len(WHITEOUT) :], None)
            elif member.isdir():
                existing = parent.children.get(name)
                if existing is not None and existing.is_dir:
                    existing.info, existing.layer = member, layer
                else:
                    parent.children[name] = _Node(member, layer, ordinal, {})
            else:
                parent.children[name] = _Node(member, layer, ordinal)

    def find(self, parts: list[str]) -> _Node | None:
        node: _Node | None = self.root
        for part in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node


class _Writer:
    """Inserts the final tree's rows, then the content, then the hard links."""

    def __init__(self, packer: Packer, tree: _Tree) -> None:
        self.packer = packer
        self.tree = tree
        self.wanted: dict[tuple[int, int], int] = {}  # (layer, ordinal) -> ino
        self.links: list[tuple[int, tarfile.TarInfo]] = []
        self.inos: dict[int, int] = {}  # id(node) -> ino

    def row(self, parent: int, name: str, node: _Node) -> int:
        info = node.info
        if info is None:  # implied directory
            return self.packer.insert_row(
                parent, name, 4096, (0, 0, stat.S_IFDIR | 0o755, 0), (0, 0)
            )
        kind = _KINDS.get(info.type, stat.S_IFREG)
        size, rdev = 0, 0
        if kind == stat.S_IFDIR:
            size = 4096
        elif kind == stat.S_IFREG and not info.islnk():
            size = info.size
        elif kind == stat.S_IFLNK:
            size = len(os.fsencode(info.linkname))
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = os.makedev(info.devmajor, info.devminor)
        mtime = int(info.mtime)
        mode = kind | stat.S_IMODE(info.mode)
        ino = self.packer.insert_row(
            parent, name, size, (info.uid, info.gid, mode, rdev), (mtime, mtime)
        )
        stats = self.packer.stats
        if kind == stat.S_IFLNK:
            self.packer.conn.execute(
                "INSERT INTO extra (ino, data) VALUES (?, ?)", (ino, os.fsencode(info.linkname))
            )
            stats.symlinks += 1
        elif info.islnk():
            self.links.append((ino, info))
        elif kind == stat.S_IFREG:
            self.wanted[(node.layer, node.ordinal)] = ino
        elif kind == stat.S_IFDIR:
            stats.dirs += 1
        else:
            stats.specials += 1
        return ino

    def rows(self) -> None:
        root = self.row(0, "/", self.tree.root)
        self.inos[id(self.tree.root)] = root
        stack = [(root, self.tree.root)]
        while stack:
            parent, directory = stack.pop()
            assert directory.children is not None
            later = []
            for name in sorted(directory.children):
                child = directory.children[name]
                ino = self.row(parent, name, child)
                self.inos[id(child)] = ino
                if child.is_dir:
                    later.append((ino, child))
            stack.extend(reversed(later))

    def content(self, layers: Sequence[Opener]) -> None:
        for index, opener in enumerate(layers):
            if not any(layer == index for layer, _ in self.wanted):
                continue
            with _tar_stream(opener, self.tree.label) as tar:
                for ordinal, member in enumerate(tar):
                    ino = self.wanted.get((index, ordinal))
                    if ino is None:
                        continue
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular member
                    size = self.packer.add_data(ino, handle)  # type: ignore[arg-type]
                    self.packer.stats.files += 1
                    self.packer.stats.bytes += size

    def hard_links(self) -> None:
        for ino, info in self.links:
            target: _Node | None = None
            name = info.linkname
            for _ in range(len(self.links) + 1):  # a link to a link names the same file
                target = self.tree.find(_parts(name, self.tree.label))
                if target is None or target.info is None or not target.info.islnk():
                    break
                name = target.info.linkname
            primary = self.inos.get(id(target)) if target is not None else None
            if target is None or primary is None or target.is_dir or target.info is None:
                # e.g. a link to a file a later layer removed: the path stays, empty
                log.warning("hard link without its target", flist=self.tree.label, path=info.name)
                continue
            self.packer.link(ino, primary)

    def startup(self, image: Image) -> None:
        children = self.tree.root.children
        assert children is not None
        if STARTUP in children:
            return  # the image brings its own
        data = image.startup_toml()
        ino = self.packer.insert_row(
            self.inos[id(self.tree.root)],
            STARTUP,
            len(data),
            (0, 0, stat.S_IFREG | 0o644, 0),
            (0, 0),
        )
        self.packer.add_data(ino, io.BytesIO(data))
        self.packer.stats.files += 1
        self.packer.stats.bytes += len(data)


# -- images ---------------------------------------------------------------------------------------


def _json(data: bytes, label: str, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise FlistFormatError(f"{what} is not JSON: {exc}", flist=label) from None


def _image_config(config: Any, label: str) -> Image:
    settings = config.get("config") if isinstance(config, dict) else None
    settings = settings if isinstance(settings, dict) else {}
    argv = [*(settings.get("Entrypoint") or []), *(settings.get("Cmd") or [])]
    if not all(isinstance(a, str) for a in argv):
        raise FlistFormatError("image config Entrypoint/Cmd are not strings", flist=label)
    env = {}
    for item in settings.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            env[key] = value
    return Image(argv, env, str(settings.get("WorkingDir") or ""))


class _Blobs:
    """Reads files of an image by name: from a directory or from a (seekable) tar archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)
        self.tar = None if path.is_dir() else tarfile.open(path, "r:*")  # noqa: SIM115

    def opener(self, name: str) -> Opener:
        if self.tar is None:
            target = self.path / name
            if not target.is_file():
                raise FlistFormatError("image file missing", flist=self.label, path=name)
            return lambda: target.open("rb")
        try:
            member = self.tar.getmember(name)
        except KeyError:
            raise FlistFormatError("image file missing", flist=self.label, path=name) from None
        tar = self.tar

        def open_member() -> IO[bytes]:
            handle = tar.extractfile(member)
            if handle is None:
                raise FlistFormatError("image file is not a file", flist=self.label, path=name)
            return handle

        return open_member

    def read(self, name: str) -> bytes:
        with self.opener(name)() as handle:
            return handle.read(64 << 20)

    def has(self, name: str) -> bool:
        if self.tar is None:
            return (self.path / name).is_file()
        try:
            self.tar.getmember(name)
            return True
        except KeyError:
            return False

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _blob_name(descriptor: Any, label: str) -> str:
    digest = descriptor.get("digest", "") if isinstance(descriptor, dict) else ""
    algorithm, _, value = str(digest).partition(":")
    if not (algorithm.isalnum() and value.isalnum()):
        raise FlistFormatError(f"bad blob digest {digest!r}", flist=label)
    return f"blobs/{algorithm}/{value}"


def _oci_manifest(blobs: _Blobs) -> tuple[str, list[str]]:
    """(config name, layer names) of the image in an OCI layout (linux/amd64 if several)."""
    index = _json(blobs.read("index.json"), blobs.label, "index.json")
    for _ in range(4):  # an index may point at another index
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not manifests:
            raise FlistFormatError("OCI index names no manifest", flist=blobs.label)
        chosen = next(
            (
                m
                for m in manifests
                if (m.get("platform") or {}).get("architecture") in ("amd64", None)
            ),
            manifests[0],
        )
        document = _json(blobs.read(_blob_name(chosen, blobs.label)), blobs.label, "manifest")
        if "layers" in document:
            layers = [_blob_name(layer, blobs.label) for layer in document["layers"]]
            return _blob_name(document.get("config"), blobs.label), layers
        index = document
    raise FlistFormatError("OCI index nesting too deep", flist=blobs.label)


def _docker_manifest(blobs: _Blobs) -> tuple[str, list[str]]:
    manifest = _json(blobs.read("manifest.json"), blobs.label, "manifest.json")
    if not (isinstance(manifest, list) and manifest and isinstance(manifest[0], dict)):
        raise FlistFormatError("manifest.json lists no image", flist=blobs.label)
    if len(manifest) > 1:
        raise FlistFormatError("archive holds several images; save one", flist=blobs.label)
    return str(manifest[0].get("Config")), [str(layer) for layer in manifest[0].get("Layers", [])]


def _pack_image(
    blobs: _Blobs, output: Path, stores: Sequence[str], progress: bool
) -> tuple[PackStats, Image]:
    config_name, layer_names = (
        _docker_manifest(blobs) if blobs.has("manifest.json") else _oci_manifest(blobs)
    )
    image = _image_config(_json(blobs.read(config_name), blobs.label, "image config"), blobs.label)
    layers = [blobs.opener(name) for name in layer_names]
    tree = _Tree(blobs.label)
    for index, opener in enumerate(layers):
        with _tar_stream(opener, blobs.label) as tar:
            tree.apply(tar, index)

    def fill(packer: Packer) -> None:
        writer = _Writer(packer, tree)
        writer.rows()
        writer.content(layers)
        writer.hard_links()
        writer.startup(image)

    return pack_with(fill, output, stores, progress, tags=image.tags()), image


def pack_source(
    source: Path, output: Path, stores: Sequence[str], progress: bool = False
) -> tuple[PackStats, Image | None]:
    """Pack a directory, a root filesystem tar or an image; the image's run settings, if any."""
    if source.is_dir() and not (source / "oci-layout").is_file():
        return pack(source, output, stores, progress), None
    if not source.exists():
        raise FlistError("no such file or directory", flist=output, path=str(source))
    if source.is_dir():
        return _open_image(source, output, stores, progress)
    label = str(source)
    tree = _Tree(label)

    def opener() -> IO[bytes]:
        return source.open("rb")

    with _tar_stream(opener, label) as tar:
        tree.apply(tar, 0)
    if "manifest.json" in tree.top_names or {"oci-layout", "index.json"} <= tree.top_names:
        return _open_image(source, output, stores, progress)

    def fill(packer: Packer) -> None:
        writer = _Writer(packer, tree)
        writer.rows()
        writer.content([opener])
        writer.hard_links()

    return pack_with(fill, output, stores, progress), None


def _open_image(
    source: Path, output: Path, stores: Sequence[str], progress: bool
) -> tuple[PackStats, Image]:
    try:
        blobs = _Blobs(source)
    except (tarfile.TarError, OSError) as exc:
        raise FlistFormatError(f"cannot open image archive: {exc}", flist=str(source)) from None
    try:
        return _pack_image(blobs, output, stores, progress)
    except (tarfile.TarError, OSError) as exc:
        raise FlistFormatError(f"bad image archive: {exc}", flist=str(source)) from None
    finally:
        blobs.close()
