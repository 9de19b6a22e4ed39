"""Fixtures of tests/charts: the real helm binary, offline and against the test cluster."""

from __future__ import annotations

import pytest

from hack.controlplane import ControlPlane
from tests.charts.helm import Helm, build_helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm for offline commands (lint, template)."""
    return Helm(build_helm(), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def cluster_helm(helm: Helm, cluster: ControlPlane) -> Helm:
    """helm talking to the local kube-apiserver as cluster-admin."""
    return Helm(helm.binary, helm.home, cluster.kubeconfig)
