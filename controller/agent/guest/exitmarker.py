"""The container entrypoint's exit, as our initramfs reports it on the serial console.

The init stays PID 1, runs the entrypoint as its child and, when it ends, prints

    zm-init: exit nonce=<nonce> code=<0-255> reason=<Completed|Error|NotFound|...>

then powers the VM off. ``nonce`` is fresh for every VMM start and reaches the guest only
on its kernel command line, so text a guest program prints (a log line an attacker
chose) cannot pass for the marker of this boot, nor can a marker of an earlier boot
still in the log. A guest root can read the command line, but it owns the exit code
anyway.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_MARKER = re.compile(
    rb"^zm-init: exit nonce=(?P<nonce>[0-9a-f]{32}) code=(?P<code>[0-9]{1,3}) "
    rb"reason=(?P<reason>[A-Za-z]{1,32})\r?$",
    re.MULTILINE,
)
# Enough for the marker and the kernel's few lines after it (it is printed last).
TAIL_BYTES = 64 << 10


@dataclass(frozen=True)
class EntrypointExit:
    code: int
    reason: str  # Completed (0), Error, NotFound (127), NotExecutable (126), InitError (125)


def new_nonce() -> str:
    return secrets.token_hex(16)


def find_exit(console: bytes, nonce: str) -> EntrypointExit | None:
    """The last exit marker of the boot ``nonce`` in the console output, if any."""
    if not nonce:
        return None
    found = None
    for m in _MARKER.finditer(console):
        if m["nonce"].decode() == nonce:
            found = EntrypointExit(int(m["code"]), m["reason"].decode())
    return found
