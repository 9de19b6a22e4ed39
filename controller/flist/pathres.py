"""Symlink-aware path resolution confined to a root (an flist or a mounted directory).

Absolute link targets are taken relative to the root, never the host. A path that climbs above
the root, more than 40 links, or a missing component is a typed error.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from controller.flist.errors import FlistLinkError, FlistNotADirectoryError, FlistNotFoundError

MAX_LINKS = 40

Parts = tuple[str, ...]


class FsView(Protocol):
    """The two questions resolution asks of a tree; ``parts`` are relative to its root."""

    label: str

    def lstat_kind(self, parts: Parts) -> int | None:
        """S_IFMT of the entry (not following a final link), or None if absent."""

    def readlink(self, parts: Parts) -> str:
        """Target of the symlink at ``parts``."""


def split(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def show(parts: Parts) -> str:
    return "/" + "/".join(parts)


def resolve(view: FsView, path: str, *, follow_final: bool = True) -> Parts:
    """Resolve ``path`` inside ``view``; returns the components of the real entry."""
    pending = split(path)
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not resolved:
                raise FlistLinkError(
                    "resolution climbs above the root", flist=view.label, path=path
                )
            resolved.pop()
            continue
        candidate = (*resolved, part)
        kind = view.lstat_kind(candidate)
        if kind is None:
            raise FlistNotFoundError(
                f"{show(candidate)} does not exist", flist=view.label, path=path
            )
        if kind == stat.S_IFLNK and (pending or follow_final):
            links += 1
            if links > MAX_LINKS:
                raise FlistLinkError(
                    "too many levels of symbolic links (loop?)", flist=view.label, path=path
                )
            target = view.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = split(target) + pending
            continue
        if pending and kind != stat.S_IFDIR:
            raise FlistNotADirectoryError(
                f"{show(candidate)} is not a directory", flist=view.label, path=path
            )
        resolved.append(part)
    return tuple(resolved)


class DirView:
    """A real directory tree (e.g. a mounted flist) seen through ``lstat``/``readlink``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def lstat_kind(self, parts: Parts) -> int | None:
        try:
            return stat.S_IFMT(os.lstat(self.root.joinpath(*parts)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readlink(self, parts: Parts) -> str:
        return os.readlink(self.root.joinpath(*parts))
