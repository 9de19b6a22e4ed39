"""The mount table lookup on the real /proc/self/mountinfo: the mount point field exactly,
with the kernel's octal escapes, never the root field of a bind mount or a prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.flist import syscalls

MS_BIND = 4096

pytestmark = pytest.mark.fuse  # root: mount(2)


def test_any_mountpoint_matches_the_mount_point_field_exactly(tmp_path: Path) -> None:
    odd = tmp_path / "a b\\c\td\ne"  # every character mountinfo escapes
    sibling = tmp_path / "a b\\c\td\nex"
    source, bound = tmp_path / "source", tmp_path / "bound"
    for d in (odd, sibling, source, bound):
        d.mkdir()
    assert not syscalls.any_mountpoint([str(odd)])
    syscalls.mount("tmpfs", str(odd), "tmpfs", 0, "size=1m")
    try:
        syscalls.mount(str(source), str(bound), "", MS_BIND, "")
        try:
            assert syscalls.any_mountpoint([str(odd)])
            assert syscalls.any_mountpoint([str(sibling), str(odd)])
            assert syscalls.any_mountpoint([str(bound)])
            assert not syscalls.any_mountpoint([str(sibling)])
            assert not syscalls.any_mountpoint([str(odd)[:-1]])  # a prefix of it
            assert not syscalls.any_mountpoint([str(source)])  # only the bind's root field
            assert not syscalls.any_mountpoint([str(tmp_path)])
            assert not syscalls.any_mountpoint([])
        finally:
            syscalls.umount(str(bound))
    finally:
        syscalls.umount(str(odd))
    assert not syscalls.any_mountpoint([str(odd), str(bound)])
    assert syscalls.any_mountpoint(["/proc"])
