"""Planetary (Yggdrasil) from the controller's side: which nodes run a router, and whom
each router dials (every other Ready node's, as each node learns its WireGuard peers)."""

from __future__ import annotations

from collections.abc import Mapping

from controller.operator.inventory import NodeView


def misfit(node: NodeView) -> str | None:
    """Why the node cannot give a Zmachine a planetary NIC."""
    return None if node.planetary_peer else "has no Yggdrasil router (planetary)"


def peers_for(node: str, nodes: Mapping[str, NodeView]) -> list[str]:
    """The routers `node`'s router dials: all other Ready nodes that run one. One side
    dialling is enough for a link, so a node that learns of a newer one later still meets
    it as soon as the newer one dials."""
    return sorted(
        v.planetary_peer
        for name, v in nodes.items()
        if name != node and v.ready and v.planetary_peer
    )
