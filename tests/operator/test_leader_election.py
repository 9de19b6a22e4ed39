"""Two controller replicas: one leads, the other stands by alive, and takes over on a stop."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from hack.controlplane import ControlPlane
from tests.api.test_admission import valid_manifest
from tests.operator.conftest import start_controller, wait_for


def phase_of(cluster: ControlPlane, name: str, ns: str) -> str | None:
    obj = cluster.get("zm", name, ns) or {}
    phase = (obj.get("status") or {}).get("phase")
    return None if phase is None else str(phase)


def test_standby_takes_over_when_the_leader_stops(
    cluster: ControlPlane, ns: str, tmp_path: Path
) -> None:
    leader = start_controller(cluster, ns, tmp_path / "a.log")
    standby = None
    try:
        wait_for(
            lambda: leader.healthz() and "became leader" in leader.log.read_text(),
            timeout=60,
            what="the first controller to lead",
        )
        standby = start_controller(cluster, ns, tmp_path / "b.log")
        # Alive for its liveness probe, yet acting on nothing.
        wait_for(lambda: standby.healthz() == "standby\n", timeout=60, what="a live standby")
        assert "standing by" in standby.log.read_text()

        cluster.kubectl(
            "apply", "-n", ns, "-f", "-", input=yaml.safe_dump(valid_manifest("led-1", ns))
        )
        wait_for(lambda: phase_of(cluster, "led-1", ns), what="the leader to reconcile")
        assert "led-1" in leader.log.read_text()
        assert "led-1" not in standby.log.read_text()

        stopped = time.monotonic()
        leader.stop()
        assert "released leadership" in leader.log.read_text()
        wait_for(
            lambda: "became leader" in standby.log.read_text(),
            timeout=30,
            what="the standby to take over",
        )
        # The Lease was handed back, so the standby needs no expiry to pass (15 s).
        assert time.monotonic() - stopped < 15
        cluster.kubectl(
            "apply", "-n", ns, "-f", "-", input=yaml.safe_dump(valid_manifest("led-2", ns))
        )
        wait_for(lambda: phase_of(cluster, "led-2", ns), what="the new leader to reconcile")
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()
        cluster.kubectl(
            "delete", "-n", ns, "zm", "led-1", "led-2", "--ignore-not-found", "--wait=false"
        )
