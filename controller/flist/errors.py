"""Typed errors of the flist layer; every message names the flist and, where known, the path."""

from __future__ import annotations

from pathlib import Path


class FlistError(Exception):
    """Base class: something about an flist (or its blocks) is wrong or unavailable."""

    def __init__(
        self, message: str, *, flist: str | Path | None = None, path: str | None = None
    ) -> None:
        self.flist = str(flist) if flist is not None else None
        self.path = path
        self.reason = message
        where = []
        if self.flist is not None:
            where.append(f"flist {self.flist}")
        if path is not None:
            where.append(f"path {path}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class FlistFormatError(FlistError):
    """Not an flist, or a corrupt/truncated database or metadata object."""


class FlistNameError(FlistFormatError):
    """An entry name that could escape its directory ('/', '.', '..', NUL, empty, duplicate)."""


class FlistLimitError(FlistFormatError):
    """A size or count beyond what any sane flist holds."""


class FlistNotFoundError(FlistError):
    """No such path inside the flist."""


class FlistNotADirectoryError(FlistError):
    """A path component that must be a directory is not one."""


class FlistLinkError(FlistError):
    """A symlink that loops, escapes the flist root or cannot be resolved."""


class BootModeError(FlistError):
    """A boot file (kernel, initrd, image) is not a regular file."""


class BlockError(FlistError):
    """A data block could not be served."""


class BlockMissingError(BlockError):
    """No store had the block."""


class BlockCorruptError(BlockError):
    """A block failed decryption, decompression or its key check."""


class StoreError(FlistError):
    """A store URL is invalid or a store failed."""


class FlistFetchError(FlistError):
    """Downloading or verifying an flist from a URL failed."""


class FlistMountError(FlistError):
    """Mounting or unmounting an flist failed."""


class OverlayError(FlistError):
    """Mounting or unmounting the writable overlay failed."""
