"""A stand-in for the mycelium daemon, for the plumbing test on machines without mycelium.

It is NOT mycelium: it routes nothing. No package registry carries mycelium, so CI cannot
install it; this plays the two parts the agent relies on, with mycelium's command line:

* ``inspect --json --key-file K``: ``{"publicKey": ..., "address": ...}``, an address in
  400::/7 derived from the key (by sha256 here; mycelium uses x25519 and blake3), so the
  same key gives the same /64;
* ``--key-file K --tun-name NAME ...``: opens the TUN device NAME (gone when the process
  is), gives it the address with prefix /7 as mycelium does, and waits for SIGTERM.

The agent test with the real daemon runs wherever a mycelium binary is found.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def address(key_file: str) -> ipaddress.IPv6Address:
    with open(key_file, "rb") as f:
        digest = bytearray(hashlib.sha256(f.read(32)).digest()[:16])
    digest[0] = 0x04 | (digest[0] & 1)
    return ipaddress.IPv6Address(bytes(digest))


def main(argv: list[str]) -> int:
    key_file = argv[argv.index("--key-file") + 1]
    if argv[0] == "inspect":
        print(json.dumps({"publicKey": "stand-in", "address": str(address(key_file))}))
        return 0
    name = argv[argv.index("--tun-name") + 1]
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    for args in (
        ["link", "set", name, "up"],
        ["addr", "add", f"{address(key_file)}/7", "dev", name],
    ):
        subprocess.run(["ip", "-6", *args], check=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        os.read(tun, 65536)  # packets to 400::/7 are dropped: this routes nothing


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
