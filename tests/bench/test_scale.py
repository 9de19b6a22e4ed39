"""The scale benchmark itself, small (50 Zmachines, 2 nodes), so that it cannot rot; its
figures are checked for what must hold at any size, not for speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.scale import TARGETS

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]


def test_small_scale_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = ["--objects", "50", "--nodes", "2", "--rate", "5", "--steady", "10", "--idle", "20"]
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench", "scale", *argv, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(TARGETS) <= set(figures)
    assert all(isinstance(figures[k], int | float) for k in TARGETS)
    timed = ("all_running_s", "p50_s", "delete_all_s", "controller_peak_rss_mib")
    assert all(figures[k] > 0 for k in timed), figures
    # Every Zmachine costs at least its create, finalizer, placement and Running writes.
    assert figures["api_writes_per_zmachine"] >= 4, figures
    # At rest nothing is asked of the agents and nothing is written about the Zmachines:
    # the agents push, and the status.metrics snapshot interval is far longer than this.
    assert figures["idle_agent_get_rpcs"] == 0
    assert figures["idle_writes_per_zmachine_per_min"] == 0
    assert figures["p50_s"] <= figures["p95_s"] <= figures["p99_s"]
    assert "| figure | target |" in run.stdout
