"""``unpack``: an flist -> a directory tree, with modes, owners, mtimes, links and devices."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from controller.flist.cache import BlockCache
from controller.flist.errors import FlistError
from controller.flist.meta import Entry, Flist

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_file(flist: Flist, cache: BlockCache, entry: Entry, path: str, dest: Path) -> None:
    """Write a regular file; a failed block leaves no file behind (never a partial one)."""
    partial = dest.with_name(f".{dest.name}.partial")
    fd = os.open(partial, _CREATE, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            for data in cache.file_chunks(flist.blocks(entry), entry.size, path):
                handle.write(data)
        os.rename(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _finish(dest: Path, entry: Entry, owners: bool) -> None:
    if owners:
        os.chown(dest, entry.uid, entry.gid, follow_symlinks=False)
    if not entry.is_link:
        os.chmod(dest, stat.S_IMODE(entry.mode))
    ns = entry.mtime * 1_000_000_000
    os.utime(dest, ns=(ns, ns), follow_symlinks=False)


def unpack(flist: Flist, cache: BlockCache, target: Path, owners: bool | None = None) -> int:
    """Recreate the flist's tree under ``target`` (created; must be empty if it exists).

    Symlink targets are written verbatim (not rewritten like rfs does). Owners are restored when
    running as root unless ``owners`` says otherwise. Returns the number of entries written.
    """
    restore_owners = os.geteuid() == 0 if owners is None else owners
    target.mkdir(parents=True, exist_ok=True)
    if any(target.iterdir()):
        raise FlistError("unpack target is not empty", flist=flist.label, path=str(target))
    written: dict[int, Path] = {flist.root.ino: target}
    directories: list[tuple[Path, Entry]] = [(target, flist.root)]
    count = 0
    for path, entry in flist.walk():
        if entry.ino == flist.root.ino:
            continue
        dest = written[entry.parent] / entry.name
        try:
            primary = flist.hardlinks.get(entry.ino)
            if primary is not None and primary in written:
                os.link(written[primary], dest)
                count += 1
                continue
            if entry.is_dir:
                dest.mkdir(mode=0o700)
                directories.append((dest, entry))
                written[entry.ino] = dest
                count += 1
                continue
            if entry.is_file:
                write_file(flist, cache, entry, path, dest)
            elif entry.is_link:
                assert entry.target is not None
                os.symlink(entry.target, dest)
            else:
                os.mknod(dest, entry.mode, entry.rdev)
            written[entry.ino] = dest
            _finish(dest, entry, restore_owners)
        except OSError as exc:
            raise FlistError(
                f"cannot create: {exc.strerror}", flist=flist.label, path=path
            ) from None
        count += 1
    # Directories last, deepest first, so writing their children does not disturb mtimes/modes.
    for dest, entry in reversed(directories):
        _finish(dest, entry, restore_owners)
    return count
