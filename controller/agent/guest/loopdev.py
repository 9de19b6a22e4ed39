"""Loop devices through their ioctls: attach a file to a free device, detach a device.

``mount -o loop`` and ``losetup`` look at every loop device on the host (sysfs) each time
they attach or search one, so with hundreds of VMs' images attached every deploy paid for
all the others. Here an attach asks /dev/loop-control for a free device and configures
it in one ioctl (LOOP_CONFIGURE, Linux 5.8), whatever the number of devices.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.agent.errors import Unavailable

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: fd, block_size, struct loop_info64, 8 reserved u64. In loop_info64:
# device, inode, rdevice, offset, sizelimit (u64); number, encrypt_type, encrypt_key_size,
# flags (u32); file_name[64], crypt_name[64], encrypt_key[32]; init[2] (u64).
_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s 2Q 8Q")
ATTEMPTS = 20  # another process may take the free device between asking and configuring


@contextmanager
def attach(image: Path, autoclear: bool) -> Iterator[str]:
    """Attach ``image`` (read-write) to a free loop device; yields its path while this
    process holds it open. With ``autoclear`` the device detaches itself at its last
    close: ours, unless a mount of it holds it longer."""
    flags = LO_FLAGS_AUTOCLEAR if autoclear else 0
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTEMPTS):
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            finally:
                os.close(control)
            device = f"/dev/loop{number}"
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            name = os.fsencode(os.path.abspath(image))[:63]
            config = _CONFIG.pack(backing, 0, *([0] * 8), flags, name, b"", b"", *([0] * 10))
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue  # taken meanwhile: ask again
                raise Unavailable(f"{image}: attaching {device} failed: {exc.strerror}") from None
            try:
                yield device
            finally:
                os.close(fd)
            return
        raise Unavailable(f"{image}: no free loop device after {ATTEMPTS} attempts")
    finally:
        os.close(backing)


def detach(device: str) -> None:
    """Detach ``device`` (LOOP_CLR_FD); nothing to do if it is already free or going."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.EBUSY):  # free already / still mounted
            raise Unavailable(f"detaching {device} failed: {exc.strerror}") from None
    finally:
        os.close(fd)
