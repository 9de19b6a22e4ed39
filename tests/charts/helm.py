"""Runs the real helm binary (built by hack/build-helm.sh) against the chart."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "zmachine-operator"
Manifest = dict[str, Any]
# Value sets a user is likely to pass; each must lint and render.
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "ha-namespaced": ("controller.replicas=3", "controller.watchNamespaces={team-a,team-b}"),
    "existing-secret": ("tls.existingSecret=my-pki",),
    "monitoring": (
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
    ),
    "tcg-no-metrics": (
        "agent.kvm=false",
        "agent.accel=tcg",
        "agent.metricsPort=0",
        "grafana.dashboard.enabled=false",
    ),
    "tainted-nodes": (
        "agent.tolerations[0].operator=Exists",
        "agent.nodeSelector.zos\\.threefold\\.io/zmachines=true",
        "fullnameOverride=zmo",
    ),
    "hub": ("hub.enabled=true", "hub.persistence.storageClass=fast", "hub.audience=zmachine-hub"),
    "hub-static-tokens": ("hub.enabled=true", "hub.auth=tokenSecret", "hub.tokenSecret=tokens"),
}


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its stderr."""


def build_helm() -> Path:
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "build-helm.sh")], stdout=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        raise HelmError("hack/build-helm.sh failed; see its output above")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path  # HELM_*_HOME: keeps the user's repositories and cache out of the tests
    kubeconfig: Path | None = None

    def run(self, *args: str) -> str:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=env, timeout=120
        )
        if result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def template(self, *set_args: str, namespace: str = "zmachine-system") -> list[Manifest]:
        """The chart rendered with `--set` arguments, as a list of objects."""
        out = self.run(
            "template", "zm", str(CHART), "--namespace", namespace, *_set_flags(set_args)
        )
        return [doc for doc in yaml.safe_load_all(out) if doc]


def _set_flags(set_args: tuple[str, ...]) -> Iterator[str]:
    for arg in set_args:
        yield "--set"
        yield arg


def find(docs: list[Manifest], kind: str, name_suffix: str = "") -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]


def one(docs: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = find(docs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def kubelet_env(container: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: downward-API fields filled in
    from `fields`, then $(VAR) references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
    return env
