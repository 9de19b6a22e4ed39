"""The chart installs the CRDs from its own crds/ folder: it must hold exactly crds/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.charts.helm import CHART, REPO, Helm


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.yaml"))}


def test_chart_crds_match_the_generated_ones() -> None:
    generated, copied = _files(REPO / "crds"), _files(CHART / "crds")
    assert generated, "crds/ is empty"
    assert copied == generated, "chart CRDs drifted from crds/: run hack/sync-chart-crds.sh"


def test_sync_script_repairs_drift(tmp_path: Path) -> None:
    (tmp_path / "hack").mkdir()
    shutil.copy(REPO / "hack" / "sync-chart-crds.sh", tmp_path / "hack")
    shutil.copytree(REPO / "crds", tmp_path / "crds")
    stale = tmp_path / "charts" / "zmachine-operator" / "crds"
    stale.mkdir(parents=True)
    (stale / "zos.threefold.io_removed.yaml").write_text("kind: CustomResourceDefinition\n")
    name = next(iter(_files(tmp_path / "crds")))
    (stale / name).write_text("edited by hand\n")
    subprocess.run(["bash", str(tmp_path / "hack" / "sync-chart-crds.sh")], check=True)
    assert _files(stale) == _files(tmp_path / "crds")


def test_helm_renders_the_crds(helm: Helm) -> None:
    out = helm.run("show", "crds", str(CHART))
    for name in _files(REPO / "crds"):
        group, plural = name.removesuffix(".yaml").split("_")
        assert f"name: {plural}.{group}" in out
