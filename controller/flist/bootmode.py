"""How a Zmachine boots, decided by files in its flist (zos rules).

``/image.raw`` -> disk-image VM; ``/boot/vmlinuz`` (+ optional ``/boot/initrd.img``) -> the
flist's own kernel; otherwise container mode. Each may be a symlink, resolved inside the flist
root; a link escaping the root, looping, or ending at something other than a regular file is an
error rather than a silent fallback.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass
from pathlib import Path

from controller.flist import pathres
from controller.flist.errors import BootModeError, FlistNotADirectoryError, FlistNotFoundError
from controller.flist.meta import open_flist

IMAGE = "/image.raw"
KERNEL = "/boot/vmlinuz"
INITRD = "/boot/initrd.img"


class BootMode(enum.StrEnum):
    CONTAINER = "container"
    VM = "vm"
    IMAGE = "image"


@dataclass(frozen=True)
class BootInfo:
    mode: BootMode
    kernel: Path | None
    initrd: Path | None
    image: Path | None


def _find(view: pathres.FsView, path: str) -> pathres.Parts | None:
    """Resolved location of a boot file, or None when ``path`` itself does not exist."""
    parts = pathres.split(path)
    try:
        parent = pathres.resolve(view, "/".join(parts[:-1]))
    except (FlistNotFoundError, FlistNotADirectoryError):
        return None
    if view.lstat_kind((*parent, parts[-1])) is None:
        return None
    resolved = pathres.resolve(view, pathres.show((*parent, parts[-1])))  # dangling: an error
    kind = view.lstat_kind(resolved)
    if kind != stat.S_IFREG:
        what = "a directory" if kind == stat.S_IFDIR else "not a regular file"
        raise BootModeError(
            f"resolves to {pathres.show(resolved)}, which is {what}", flist=view.label, path=path
        )
    return resolved


def detect(view: pathres.FsView, root: Path) -> BootInfo:
    def located(path: str) -> Path | None:
        found = _find(view, path)
        return None if found is None else root.joinpath(*found)

    image = located(IMAGE)
    if image is not None:
        return BootInfo(BootMode.IMAGE, None, None, image)
    kernel = located(KERNEL)
    if kernel is not None:
        return BootInfo(BootMode.VM, kernel, located(INITRD), None)
    return BootInfo(BootMode.CONTAINER, None, None, None)


def detect_boot_mode(root: Path) -> BootInfo:
    """Boot mode of a mounted (or unpacked) flist at ``root``; paths are absolute under it."""
    return detect(pathres.DirView(root), root.absolute())


def detect_boot_mode_flist(flist: Path) -> BootInfo:
    """Boot mode straight from flist metadata; paths are absolute inside the flist ("/boot/..")."""
    with open_flist(flist) as opened:
        return detect(opened, Path("/"))
