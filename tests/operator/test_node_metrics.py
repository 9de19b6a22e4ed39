"""The controller's per-node series, which the agent-not-Ready and capacity alerts read."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from controller.operator.inventory import Inventory
from controller.operator.metrics import NodeCollector


def _scrape(collector: NodeCollector) -> dict[tuple[str, ...], float]:
    """Samples as the exposition text carries them: (name, node[, resource]) -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, *s.labels.values()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_nodes_ready_allocatable_and_allocated_follow_the_inventory() -> None:
    inventory = Inventory(cpu_ratio=2.0)
    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    inventory.observe_node(
        "n1", {}, {"address": "a"}, {**ready, "allocatable": {"cpu": 4, "memory": "8Gi"}}
    )
    inventory.observe_node("n2", {}, {"address": "b"}, {"allocatable": {"cpu": 2, "memory": "1Gi"}})
    inventory.observe_zmachine(
        "u1",
        {"namespace": "t", "name": "a"},
        {"computeCapacity": {"cpu": 3, "memory": "2Gi"}},
        "n1",
    )
    collector = NodeCollector()
    assert _scrape(collector) == {}  # nothing before the controller hands it the inventory
    collector.inventory = inventory
    assert _scrape(collector) == {
        ("zmachine_node_ready", "n1"): 1.0,
        ("zmachine_node_ready", "n2"): 0.0,
        ("zmachine_node_allocatable", "n1", "cpu"): 8.0,  # 4 cores, ratio 2
        ("zmachine_node_allocatable", "n1", "memory"): 8 * 2**30,
        ("zmachine_node_allocatable", "n2", "cpu"): 4.0,
        ("zmachine_node_allocatable", "n2", "memory"): 2**30,
        ("zmachine_node_allocated", "n1", "cpu"): 3.0,
        ("zmachine_node_allocated", "n1", "memory"): 2 * 2**30,
        ("zmachine_node_allocated", "n2", "cpu"): 0.0,
        ("zmachine_node_allocated", "n2", "memory"): 0.0,
    }

    inventory.mark_unready("n1")
    inventory.forget_node("n2")
    samples = _scrape(collector)
    assert samples[("zmachine_node_ready", "n1")] == 0.0
    assert not [key for key in samples if "n2" in key]
