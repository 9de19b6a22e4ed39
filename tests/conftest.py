"""Session fixtures shared by every test area: a real kube-apiserver with our CRDs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.controlplane import ControlPlane

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on loopback, with the project's CRDs installed and established."""
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"))
    plane.start()
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("create", "namespace", "zmachine-system")
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def ns(cluster: ControlPlane, request: pytest.FixtureRequest) -> str:
    """A namespace of the test module's own, so that no other area's controller sees its
    objects and its controllers (started with --namespace) see no one else's."""
    name: str = "t-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace(
        "_", "-"
    )
    cluster.kubectl("create", "namespace", name, check=False)
    return name
