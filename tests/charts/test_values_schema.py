"""values.schema.json: helm refuses wrong values before anything reaches the cluster."""

from __future__ import annotations

import json

import pytest
import yaml

from hack.controlplane import ControlPlane
from tests.charts.helm import CHART, VALUE_SETS, Helm, HelmError

SCHEMA = CHART / "values.schema.json"


def _set_flags(*pairs: str) -> list[str]:
    return [flag for pair in pairs for flag in ("--set", pair)]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_supported_value_sets_validate(helm: Helm, name: str) -> None:
    helm.run("lint", "--strict", str(CHART), *_set_flags(*VALUE_SETS[name]))


def test_every_default_is_described_by_the_schema() -> None:
    """Each key of values.yaml has a schema entry (the schema forbids unknown keys, so a new
    value without one would fail every install)."""

    def walk(values: dict[str, object], schema: dict[str, object], path: str) -> list[str]:
        props = schema.get("properties")
        assert isinstance(props, dict), path
        missing = []
        for key, value in values.items():
            if key not in props:
                missing.append(f"{path}.{key}")
            elif isinstance(value, dict) and "properties" in props[key]:
                missing += walk(value, props[key], f"{path}.{key}")
        return missing

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert walk(values, json.loads(SCHEMA.read_text()), "") == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("controller.replicas=two", "at '/controller/replicas': got string, want integer"),
        ("agent.kvm=maybe", "at '/agent/kvm': got string, want boolean"),
        ("agent.metricsPort=70000", "at '/agent/metricsPort'"),
        ("agent.hypervisor=firecracker", "at '/agent/hypervisor'"),
        ("agent.stateDir=relative/dir", "at '/agent/stateDir'"),
        ("controller.replica=2", "additional properties 'replica' not allowed"),
        ("metrics.serviceMonitor.interval=often", "at '/metrics/serviceMonitor/interval'"),
    ],
)
def test_wrong_values_fail_template_naming_the_key(helm: Helm, value: str, message: str) -> None:
    with pytest.raises(HelmError) as failed:
        helm.template(value)
    assert "values don't meet the specifications of the schema" in str(failed.value)
    assert message in str(failed.value)


def test_wrong_type_fails_helm_install_and_creates_nothing(
    cluster_helm: Helm, cluster: ControlPlane
) -> None:
    namespace = "schema-check"
    with pytest.raises(HelmError) as failed:
        cluster_helm.run(
            "install", "badvalues", str(CHART), "-n", namespace, "--create-namespace",
            "--set", "controller.replicas=two",
        )  # fmt: skip
    assert "at '/controller/replicas': got string, want integer" in str(failed.value)
    assert "badvalues" not in cluster_helm.run("list", "-A", "-q")
    assert cluster.get("namespace", namespace) is None
