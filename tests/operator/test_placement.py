"""Placement picks a fitting node, spreads load and explains refusals."""

from __future__ import annotations

from controller.operator.inventory import (
    CPU_RATIO_ANNOTATION,
    Inventory,
    NodeView,
    Placement,
    Request,
)
from controller.operator.placement import choose_node

GI = 1024**3


def inventory(*nodes: NodeView) -> Inventory:
    inv = Inventory()
    for node in nodes:
        inv.nodes[node.name] = node
    return inv


def node(name: str, cpu: int = 4, mem_gi: int = 8, ready: bool = True, **labels: str) -> NodeView:
    """A node whose vCPUs are its cores (ratio 1), to keep the cpu arithmetic plain."""
    return NodeView(name, f"{name}:7443", cpu, mem_gi * GI, dict(labels), ready, cpu_ratio=1)


def test_spreads_to_the_least_loaded_node() -> None:
    inv = inventory(node("a"), node("b"))
    inv.placements["x"] = Placement("a", Request(2, 4 * GI), "default", "x")
    assert choose_node(inv, Request(1, GI), {}).node == "b"


def test_counts_placements_taken_but_not_yet_reported() -> None:
    inv = inventory(node("a", cpu=2, mem_gi=2))
    first = choose_node(inv, Request(2, 2 * GI), {})
    assert first.node == "a"
    inv.placements["first"] = Placement("a", Request(2, 2 * GI), "default", "first")
    second = choose_node(inv, Request(1, GI), {})
    assert second.node is None
    assert "insufficient cpu" in second.message


def test_unschedulable_message_counts_reasons() -> None:
    inv = inventory(node("a", ready=False), node("b", mem_gi=1, zone="y"), node("c", zone="x"))
    decision = choose_node(inv, Request(1, 2 * GI), {"zone": "y"})
    assert decision.node is None and decision.reason == "Unschedulable"
    assert decision.message.startswith("0/3 nodes can run it:")
    for part in ("1 does not match nodeSelector", "1 insufficient memory", "1 not Ready", "2.00Gi"):
        assert part in decision.message


def test_node_selector_and_pinning() -> None:
    inv = inventory(node("a"), node("b", gpu="true"))
    assert choose_node(inv, Request(1, GI), {"gpu": "true"}).node == "b"
    assert choose_node(inv, Request(1, GI), {}, pinned="a").node == "a"
    assert "not registered" in choose_node(inv, Request(1, GI), {}, pinned="zz").message
    assert "insufficient cpu" in choose_node(inv, Request(9, GI), {}, pinned="a").message


def test_no_nodes() -> None:
    assert choose_node(Inventory(), Request(1, GI), {}).message == "no ZmachineNode is registered"


def test_cpu_is_overcommitted_by_the_ratio_memory_is_not() -> None:
    """A 2-core node takes twenty 1-vCPU Zmachines at the default ratio of 10."""
    inv = Inventory()
    inv.nodes["small"] = NodeView("small", "small:7443", cores=2, memory=64 * GI, ready=True)
    for i in range(20):
        decision = choose_node(inv, Request(1, GI), {})
        assert decision.node == "small", (i, decision)
        inv.placements[str(i)] = Placement("small", Request(1, GI), "ns", str(i))
    assert "1 insufficient cpu" in choose_node(inv, Request(1, GI), {}).message
    assert "insufficient memory" in choose_node(inv, Request(0, 45 * GI), {}).message


def test_a_node_annotation_sets_its_own_ratio() -> None:
    inv = Inventory(cpu_ratio=10)
    meta = {"annotations": {CPU_RATIO_ANNOTATION: "1.5"}}
    inv.observe_node("a", meta, {"address": "a:1"}, {"allocatable": {"cpu": 4, "memory": "8Gi"}})
    assert inv.nodes["a"].cpu == 6


def test_nodes_that_refused_are_avoided() -> None:
    inv = inventory(node("a"), node("b", cpu=8))
    assert choose_node(inv, Request(1, GI), {}, avoid={"b"}).node == "a"
    refused = choose_node(inv, Request(1, GI), {}, avoid={"a", "b"})
    assert refused.node is None and "2 refused it lately" in refused.message
