"""Boot-mode detection on a directory (a mounted flist) and straight from flist metadata."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.flist.bootmode import (
    BootInfo,
    BootMode,
    detect_boot_mode,
    detect_boot_mode_flist,
)
from controller.flist.errors import BootModeError, FlistError, FlistLinkError
from controller.flist.pack import pack

Detect = Callable[[Path], tuple[BootInfo, Path]]


@pytest.fixture(params=["directory", "flist"])
def detect(request: pytest.FixtureRequest, tmp_path: Path) -> Detect:
    """Run detection the way the param says; returns the info and the root its paths use."""

    def run(root: Path) -> tuple[BootInfo, Path]:
        if request.param == "directory":
            return detect_boot_mode(root), root
        flist = tmp_path / f"{root.name}.fl"
        pack(root, flist, [f"dir://{tmp_path / 'store'}"])
        return detect_boot_mode_flist(flist), Path("/")

    return run


def tree(base: Path, name: str, links: dict[str, str], files: tuple[str, ...] = ()) -> Path:
    root = base / name
    root.mkdir()
    for path in files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    for path, target in links.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / path)
    return root


def test_container_mode(detect: Detect, tmp_path: Path) -> None:
    info, _ = detect(tree(tmp_path, "plain", {}, ("bin/sh", "boot/config")))
    assert info == BootInfo(BootMode.CONTAINER, None, None, None)


def test_vm_mode_with_linked_kernel(detect: Detect, tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        "vm",
        {"boot/vmlinuz": "/boot/vmlinuz-6.1.0", "boot/initrd.img": "initrd.img-6.1.0"},
        ("boot/vmlinuz-6.1.0", "boot/initrd.img-6.1.0"),
    )
    info, base = detect(root)
    assert info.mode is BootMode.VM
    assert info.kernel == base / "boot/vmlinuz-6.1.0"  # absolute target taken inside the root
    assert info.initrd == base / "boot/initrd.img-6.1.0"
    assert info.image is None


def test_vm_mode_without_initrd_and_linked_boot_dir(detect: Detect, tmp_path: Path) -> None:
    root = tree(tmp_path, "vm2", {"boot": "usr/boot"}, ("usr/boot/vmlinuz",))
    info, base = detect(root)
    assert (info.mode, info.kernel, info.initrd) == (BootMode.VM, base / "usr/boot/vmlinuz", None)


def test_image_mode_wins(detect: Detect, tmp_path: Path) -> None:
    info, base = detect(tree(tmp_path, "img", {}, ("image.raw", "boot/vmlinuz")))
    assert info == BootInfo(BootMode.IMAGE, None, None, base / "image.raw")


@pytest.mark.parametrize(
    ("links", "files", "error", "message"),
    [
        ({"boot/vmlinuz": "../../../../etc/hostname"}, (), FlistLinkError, "above the root"),
        (
            {"boot/vmlinuz": "vmlinuz2", "boot/vmlinuz2": "vmlinuz"},
            (),
            FlistLinkError,
            "too many levels",
        ),
        ({"boot/vmlinuz": "/usr"}, ("usr/x",), BootModeError, "directory"),
        ({"image.raw": "nowhere"}, (), FlistError, "does not exist"),
    ],
)
def test_bad_boot_links_are_refused(
    detect: Detect,
    tmp_path: Path,
    links: dict[str, str],
    files: tuple[str, ...],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        detect(tree(tmp_path, "bad", links, files))


def test_kernel_directory_is_refused(detect: Detect, tmp_path: Path) -> None:
    root = tree(tmp_path, "dirkernel", {}, ("boot/vmlinuz/file",))
    with pytest.raises(BootModeError, match="/boot/vmlinuz"):
        detect(root)
