"""The chart's alerts: valid rules, unit-tested with promtool, shipped as a PrometheusRule."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.charts.helm import CHART, Helm
from tests.charts.test_dashboard import exported_series, metric_names

RULES = CHART / "rules" / "zmachine-operator.rules.yaml"
UNIT_TESTS = Path(__file__).parent / "prometheus" / "alerts.test.yaml"
# What the alerts must cover (issue: a Zmachine Failed or crash-looping, an agent not Ready,
# reconcile errors rising, a node out of capacity, a Zmachine stuck Pending).
ALERTS = {
    "ZmachineFailed",
    "ZmachineCrashLooping",
    "ZmachineAgentNotReady",
    "ZmachineReconcileErrorsRising",
    "ZmachineNodeOutOfCapacity",
    "ZmachineStuckPending",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    # Debian's prometheus package, installed by hack/install-system-deps.sh: never a skip.
    assert binary, "promtool not found: run hack/install-system-deps.sh"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_present_and_unit_tested() -> None:
    names = {str(rule["alert"]) for rule in rules()}
    assert names == ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == ALERTS


def test_alerts_query_only_exported_metrics() -> None:
    queried = {name for rule in rules() for name in metric_names(str(rule["expr"]))}
    assert queried - exported_series() == set()


@pytest.mark.parametrize(
    ("alert", "before", "after"),
    [
        ("ZmachineNodeOutOfCapacity", "> 0.9", "> 0.96"),
        ("ZmachineCrashLooping", ">= 3", ">= 4"),
        ("ZmachineAgentNotReady", "for: 5m", "for: 1m"),
        ("ZmachineReconcileErrorsRising", "0.1 *", "0.3 *"),
    ],
)
def test_unit_tests_catch_a_changed_alert(
    alert: str, before: str, after: str, tmp_path: Path
) -> None:
    """A threshold or duration moved in one alert makes its unit test fail."""
    text = RULES.read_text()
    start = text.index(f"alert: {alert}\n")
    end = text.find("- alert:", start)
    end = len(text) if end < 0 else end
    block = text[start:end]
    assert before in block
    changed = tmp_path / "rules.yaml"
    changed.write_text(text[:start] + block.replace(before, after) + text[end:])
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(changed)]
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert re.search(rf"alertname: {alert}\b", result.stdout + result.stderr), result.stdout


def test_prometheus_rule_is_opt_in_and_carries_the_rule_file(helm: Helm) -> None:
    assert not [d for d in helm.template() if d["kind"] == "PrometheusRule"]
    docs = helm.template(
        "metrics.prometheusRule.enabled=true", "metrics.prometheusRule.labels.release=prom"
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "zmachine-system"
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
