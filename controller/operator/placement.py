"""Choosing a node for a Zmachine: fit by cpu and memory, match labels, spread load."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from controller.operator.inventory import Inventory, NodeView, Request

GI = 1024**3


@dataclass(frozen=True)
class Decision:
    node: str | None
    reason: str  # Placed, Pinned or Unschedulable
    message: str


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GI:.2f}Gi" if nbytes >= GI else f"{nbytes // (1024 * 1024)}Mi"


def _misfit(
    node: NodeView, request: Request, used: Request, selector: Mapping[str, str]
) -> str | None:
    if not node.ready or not node.renewing:
        return "not Ready"
    missing = [k for k, v in selector.items() if node.labels.get(k) != v]
    if missing:
        return "does not match nodeSelector"
    if node.cpu - used.cpu < request.cpu:
        return f"insufficient cpu (requested {request.cpu}, free {node.cpu - used.cpu})"
    if node.memory - used.memory < request.memory:
        return (
            f"insufficient memory (requested {_fmt(request.memory)}, "
            f"free {_fmt(node.memory - used.memory)})"
        )
    return None


def resize_misfit(inventory: Inventory, uid: str, node: NodeView, request: Request) -> str | None:
    """Why the node cannot take this Zmachine at `request` instead of what it holds now."""
    used = inventory.used(node.name)
    held = inventory.placements.get(uid)
    if held is not None and held.node == node.name:
        used = Request(used.cpu - held.request.cpu, used.memory - held.request.memory)
    return _misfit(node, request, used, {})


def choose_node(
    inventory: Inventory,
    request: Request,
    selector: Mapping[str, str],
    pinned: str | None = None,
    avoid: Collection[str] = (),
    misfit: Callable[[NodeView], str | None] | None = None,
) -> Decision:
    """Pick the fitting Ready node that stays least loaded; explain when none fits.
    `avoid`: nodes that refused this Zmachine lately (they know their capacity best);
    `misfit`: why a node cannot serve the Zmachine's networks, if it cannot."""

    def why_not(node: NodeView, used: Request, selector: Mapping[str, str]) -> str | None:
        return _misfit(node, request, used, selector) or (misfit(node) if misfit else None)

    if pinned:
        node = inventory.nodes.get(pinned)
        if node is None:
            return Decision(
                None, "Unschedulable", f"node {pinned} (spec.nodeName) is not registered"
            )
        why = why_not(node, inventory.used(pinned), {})
        if why:
            return Decision(None, "Unschedulable", f"node {pinned} (spec.nodeName) {why}")
        return Decision(pinned, "Pinned", f"pinned to node {pinned}")

    if not inventory.nodes:
        return Decision(None, "Unschedulable", "no ZmachineNode is registered")
    reasons: dict[str, int] = {}
    fits: list[tuple[float, str]] = []
    for node in inventory.nodes.values():
        used = inventory.used(node.name)
        why = "refused it lately" if node.name in avoid else why_not(node, used, selector)
        if why:
            key = why.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
            continue
        # Spread: the node whose busier resource stays least utilised after placement.
        load = max(
            (used.cpu + request.cpu) / max(node.cpu, 1),
            (used.memory + request.memory) / max(node.memory, 1),
        )
        fits.append((load, node.name))
    if not fits:
        detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return Decision(
            None,
            "Unschedulable",
            f"0/{len(inventory.nodes)} nodes can run it: {detail} "
            f"(requested cpu {request.cpu}, memory {_fmt(request.memory)})",
        )
    _, best = min(fits)
    return Decision(best, "Placed", f"placed on node {best}")
