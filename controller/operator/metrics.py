"""Prometheus metrics of the controller."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from controller.api.zmachine import Phase
from controller.operator.inventory import Inventory

RECONCILES = Counter(
    "zmachine_reconciles_total", "Reconciliations of Zmachines by result.", ["result"]
)
RECONCILE_SECONDS = Histogram(
    "zmachine_reconcile_duration_seconds", "Time spent in one reconciliation."
)
AGENT_CALL_SECONDS = Histogram(
    "zmachine_agent_call_duration_seconds", "Latency of calls to node agents.", ["method"]
)
AGENT_CALL_ERRORS = Counter(
    "zmachine_agent_call_errors_total", "Failed calls to node agents.", ["method", "code"]
)
TIME_TO_RUNNING = Histogram(
    "zmachine_time_to_running_seconds",
    "Time from a Zmachine's creation to its first Running phase.",
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)

WATCH_EVENTS = Counter(
    "zmachine_agent_watch_events_total", "Messages received on node agents' event streams."
)
WATCH_RECONNECTS = Counter(
    "zmachine_agent_watch_reconnects_total", "Node agent event streams opened again."
)
KICKS = Counter(
    "zmachine_reconcile_triggers_total",
    "Reconciliations asked for, by cause (change, agent, capacity, resync).",
    ["cause"],
)
STATUS_WRITES = Counter("zmachine_status_writes_total", "Status patches of Zmachines.")


class PhaseCollector(Collector):
    """Zmachines by phase, from the controller's view of every object it watches."""

    def __init__(self) -> None:
        self.phases: dict[str, str] = {}

    def observe(self, uid: str, phase: str | None) -> None:
        if phase is None:
            self.phases.pop(uid, None)
        else:
            self.phases[uid] = phase

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("zmachines", "Zmachines by phase.", labels=["phase"])
        for phase in Phase:
            count = sum(1 for p in self.phases.values() if p == phase.value)
            family.add_metric([phase.value], count)
        yield family


PHASES = PhaseCollector()
REGISTRY.register(PHASES)


class NodeCollector(Collector):
    """Per registered node: Ready, and what it can take against what is placed on it, for
    the alerts on a lost agent and a full node (charts/.../templates/prometheusrule.yaml)."""

    def __init__(self) -> None:
        self.inventory: Inventory | None = None

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "zmachine_node_ready", "1 if the node's agent is Ready.", labels=["node"]
        )
        allocatable = GaugeMetricFamily(
            "zmachine_node_allocatable",
            "What a node can take: vCPUs (cores times the allocation ratio), memory bytes.",
            labels=["node", "resource"],
        )
        allocated = GaugeMetricFamily(
            "zmachine_node_allocated",
            "What the Zmachines placed on a node request: vCPUs, memory bytes.",
            labels=["node", "resource"],
        )
        inventory = self.inventory or Inventory()
        for node in list(inventory.nodes.values()):
            used = inventory.used(node.name)
            ready.add_metric([node.name], 1.0 if node.ready else 0.0)
            for family, cpu, memory in (
                (allocatable, node.cpu, node.memory),
                (allocated, used.cpu, used.memory),
            ):
                family.add_metric([node.name, "cpu"], cpu)
                family.add_metric([node.name, "memory"], memory)
        yield from (ready, allocatable, allocated)


NODES = NodeCollector()
REGISTRY.register(NODES)


def serve(port: int) -> None:
    start_http_server(port)
