"""Network namespaces the tests make for themselves: guests and taps never touch the host's."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def bridged_netns(prefix: str, bridge: str, address: str) -> Iterator[str]:
    """A fresh namespace holding `bridge` with `address` (CIDR) up; deleted afterwards."""
    name = f"{prefix}{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["link", "add", bridge, "type", "bridge"],
            ["addr", "add", address, "dev", bridge],
            ["link", "set", bridge, "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
