"""Serial log rotation while the VMM keeps appending to the same open file."""

from __future__ import annotations

import os
from pathlib import Path

from controller.agent.guest.provision import rotate


def test_rotation_keeps_the_tail_and_the_writer_keeps_appending(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    # Like QEMU's chardev logfile with logappend=on: an O_APPEND descriptor held open.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        lines = b"".join(b"line %04d\n" % i for i in range(400))  # 4000 bytes
        os.write(fd, lines)
        rotate(log, limit=2000)
        assert (tmp_path / "console.log.1").read_bytes() == lines
        assert log.read_bytes() == lines[-1000:]
        os.write(fd, b"after rotation\n")
        assert log.read_bytes() == lines[-1000:] + b"after rotation\n"  # no hole, no loss
        rotate(log, limit=2000)  # below the limit: untouched
        assert log.read_bytes().endswith(b"after rotation\n")
    finally:
        os.close(fd)
