"""Public NICs: taps on the bridge ``zpub`` of the node's namespace, whose other port is
the node's public interface (``--public-interface``), as zos bridges ``br-pub`` to its
public NIC. The guests hold their public addresses themselves; the bridge has none, so
the node stays off the public segment.

The bridge exists while a public tap does: the last tap gone, the interface is released
and the bridge deleted, so a node without public machines keeps no trace of them. The
interface should be dedicated to guests: as a bridge port, addresses the node had on it
no longer serve the node.
"""

from __future__ import annotations

import json
import threading

import structlog

from controller.agent.errors import FailedPrecondition
from controller.agent.network.local import _check, _ip, create_tap, delete_tap, link_exists

log = structlog.get_logger(__name__)

BRIDGE = "zpub"


class PublicBridge:
    """The node's public bridge (one per agent)."""

    def __init__(self, node_netns: str | None, interface: str | None) -> None:
        self.netns = node_netns
        self.interface = interface
        # A tap joining while the last one leaves must not find its bridge deleted.
        self._lock = threading.Lock()

    def available(self) -> str:
        """The public interface when it exists on the node, else ''."""
        if self.interface and link_exists(self.interface, self.netns):
            return self.interface
        return ""

    def attach(self, tap: str, where: str) -> None:
        """Create (or keep) ``tap`` on the public bridge, the bridge set up first."""
        with self._lock:
            if not self.available():
                raise FailedPrecondition(
                    f"{where}: this node has no public interface (agent flag "
                    f"--public-interface {self.interface or 'unset'})"
                )
            assert self.interface is not None  # available() says so
            if not link_exists(BRIDGE, self.netns):
                _check(_ip(self.netns, "link", "add", BRIDGE, "type", "bridge"), BRIDGE)
                log.info("public bridge created", bridge=BRIDGE, interface=self.interface)
            _check(_ip(self.netns, "link", "set", BRIDGE, "addrgenmode", "none"), BRIDGE)
            _check(_ip(self.netns, "link", "set", BRIDGE, "up"), BRIDGE)
            _check(
                _ip(self.netns, "link", "set", self.interface, "master", BRIDGE, "up"),
                f"{BRIDGE}: port {self.interface}",
            )
            create_tap(tap, BRIDGE, self.netns)

    def detach(self, tap: str) -> None:
        """Remove ``tap``; the bridge goes with the last public tap."""
        with self._lock:
            delete_tap(tap, self.netns)
            if not link_exists(BRIDGE, self.netns):
                return
            out = _ip(self.netns, "-j", "link", "show", "master", BRIDGE)
            ports = {p["ifname"] for p in json.loads(out.stdout or "[]")}
            if ports - {self.interface}:
                return
            if self.interface is not None and self.interface in ports:
                _check(_ip(self.netns, "link", "set", self.interface, "nomaster"), BRIDGE)
            _check(_ip(self.netns, "link", "del", BRIDGE), BRIDGE)
            log.info("public bridge removed", bridge=BRIDGE, interface=self.interface)
