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


@contextlib.contextmanager
def underlay(nodes: list[str], public: bool = True) -> Iterator[dict[str, tuple[str, str]]]:
    """Nodes joined by an underlay: one namespace per node (its ``uplink`` on
    192.0.2.(11+i)/24) and one holding bridge ``ul0``; with `public`, a "public" host
    (namespace, 192.0.2.100) on that segment, beyond every node's uplink.

    Yields {name: (namespace, address)} for each node, the underlay ("underlay") and the
    public host ("public"). Every namespace (and so every link) goes afterwards."""
    tag = os.getpid() % 100000
    spaces = {"underlay": (f"zmul{tag}", "")}
    for i, node in enumerate(nodes):
        spaces[node] = (f"zmnode{i}x{tag}", f"192.0.2.{11 + i}")
    if public:
        spaces["public"] = (f"zmpub{tag}", "192.0.2.100")
    ul = spaces["underlay"][0]
    try:
        for ns, _ in spaces.values():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ul, "link", "add", "ul0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ul, "link", "set", "ul0", "up"], check=True)
        for i, (key, (ns, address)) in enumerate(spaces.items()):
            if key == "underlay":
                continue
            port = f"p{i}"
            for cmd in (
                [
                    "-n",
                    ul,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "uplink",
                    "netns",
                    ns,
                ],
                ["-n", ul, "link", "set", port, "master", "ul0", "up"],
                ["-n", ns, "addr", "add", f"{address}/24", "dev", "uplink"],
                ["-n", ns, "link", "set", "dev", "uplink", "up"],
            ):
                subprocess.run(["ip", *cmd], check=True)
        yield spaces
    finally:
        for ns, _ in spaces.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)
