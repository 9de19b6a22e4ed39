"""The Grafana dashboard queries only metrics the controller and the agent really export."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client.core import Metric
from prometheus_client.registry import REGISTRY

from controller.agent.runtime.machines import Machines
from controller.agent.runtime.metrics import MachineCollector
from controller.operator import metrics as controller_metrics
from tests.charts.helm import CHART

DASHBOARD = CHART / "dashboards" / "zmachine-operator.json"
# Series names each metric type exposes (prometheus-client strips _total from counters).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def _series(families: list[Metric]) -> set[str]:
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


def exported_series() -> set[str]:
    """Series names from the real collectors: the controller's registry and the agent's."""
    assert controller_metrics.PHASES  # importing the module registers the controller's metrics
    controller = [f for f in REGISTRY.collect() if f.name.startswith("zmachine")]
    # fake_machines: no VM runs here; the collector still names every family it exports.
    fake_machines = cast(Machines, SimpleNamespace(records={}))
    loop = asyncio.new_event_loop()
    try:
        agent = list(MachineCollector(fake_machines, loop).collect())
    finally:
        loop.close()
    return _series(controller) | _series(agent)


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def queries(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    # Label values ("$zmachine") and label names are not metrics; metric names start the
    # project's prefix.
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\bzmachines?\w*", without_strings))


def test_every_queried_metric_is_exported() -> None:
    exported = exported_series()
    queried = {name for expr in queries(dashboard()) for name in metric_names(expr)}
    assert queried, "no zmachine metric found in the dashboard"
    assert queried - exported == set(), f"exported: {sorted(exported)}"


@pytest.mark.parametrize(
    "series",
    [
        "zmachines",
        "zmachine_reconciles_total",
        "zmachine_reconcile_duration_seconds_bucket",
        "zmachine_agent_call_duration_seconds_bucket",
        "zmachine_agent_call_errors_total",
        "zmachine_time_to_running_seconds_bucket",
        "zmachine_vcpu_seconds_total",
        "zmachine_vmm_memory_bytes",
        "zmachine_net_rx_bytes_total",
        "zmachine_net_tx_bytes_total",
        "zmachine_block_read_bytes_total",
        "zmachine_block_write_bytes_total",
        "zmachine_restarts_total",
        "zmachine_boot_duration_seconds",
    ],
)
def test_dashboard_has_a_panel_for(series: str) -> None:
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    titled = [p["title"] for p in panels for t in p["targets"] if series in metric_names(t["expr"])]
    assert titled, f"no panel queries {series}"


def test_drift_check_catches_an_unknown_metric() -> None:
    board = dashboard()
    board["panels"][1]["targets"][0]["expr"] = "sum(zmachine_reconcile_total)"  # typo
    queried = {name for expr in queries(board) for name in metric_names(expr)}
    assert "zmachine_reconcile_total" in queried - exported_series()


def test_panels_are_well_formed() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)
