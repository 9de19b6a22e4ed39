"""Prometheus metrics of the controller."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from controller.api.zmachine import Phase

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


def serve(port: int) -> None:
    start_http_server(port)
