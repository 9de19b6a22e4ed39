"""The controller takes ownership of a Zmachine, reports status and releases it on delete."""

from __future__ import annotations

import json
import urllib.request

import yaml

from hack.controlplane import ControlPlane
from tests.api.test_admission import valid_manifest
from tests.operator.conftest import RunningController, wait_for


def test_finalizer_status_events_and_release(
    cluster: ControlPlane, ns: str, controller: RunningController
) -> None:
    manifest = valid_manifest("lifecycle", ns)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(manifest))

    obj = wait_for(
        lambda: (
            (o := cluster.get("zm", "lifecycle", ns)) and o.get("status", {}).get("phase") and o
        ),
        what="a status phase",
    )
    assert "zos.threefold.io/finalizer" in obj["metadata"]["finalizers"]
    status = obj["status"]
    assert status["phase"] == "Pending"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"]
    assert scheduled["lastTransitionTime"]

    events = wait_for(
        lambda: json.loads(
            cluster.kubectl(
                "get",
                "-n",
                ns,
                "events",
                "--field-selector",
                "involvedObject.name=lifecycle",
                "-o",
                "json",
            ).stdout
        )["items"],
        what="an Event on the Zmachine",
    )
    assert any("Pending" in e["message"] for e in events)

    printed = cluster.kubectl("get", "-n", ns, "zm", "lifecycle").stdout
    assert "Pending" in printed

    cluster.kubectl("delete", "-n", ns, "zm", "lifecycle", "--wait=true", "--timeout=60s")
    assert cluster.get("zm", "lifecycle", ns) is None


def test_metrics_and_liveness(
    cluster: ControlPlane, ns: str, controller: RunningController
) -> None:
    cluster.kubectl(
        "apply", "-n", ns, "-f", "-", input=yaml.safe_dump(valid_manifest("metered", ns))
    )
    wait_for(
        lambda: (o := cluster.get("zm", "metered", ns)) and o.get("status", {}).get("phase"),
        what="a phase",
    )

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics") as r:
            body: bytes = r.read()
            return body.decode()

    text = wait_for(
        lambda: 'zmachines{phase="Pending"} 1.0' in (t := scrape()) and t,
        what="the phase gauge",
        timeout=20,
        on_timeout=lambda: "\n".join(
            line for line in scrape().splitlines() if line.startswith("zmachines")
        ),
    )
    assert 'zmachine_reconciles_total{result="ok"}' in text
    assert "zmachine_reconcile_duration_seconds_bucket" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{controller.health_port}/healthz") as r:
        assert r.status == 200


def test_logs_are_json_with_object_identity(controller: RunningController) -> None:
    lines = [
        json.loads(line) for line in controller.log.read_text().splitlines() if line.startswith("{")
    ]
    reconciled = [entry for entry in lines if entry.get("event") == "reconciled"]
    assert reconciled, controller.log.read_text()[-2000:]
    assert {"namespace", "name", "uid"} <= reconciled[0].keys()


def test_unsupported_fields_are_refused_not_dropped(
    cluster: ControlPlane, ns: str, controller: RunningController
) -> None:
    manifest = valid_manifest("gpu-box", ns)
    manifest["spec"]["gpu"] = ["0000:28:00.0/1002/731f"]
    manifest["spec"]["corex"] = True
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(manifest))
    status = wait_for(
        lambda: (o := cluster.get("zm", "gpu-box", ns)) and o.get("status", {}).get("phase") and o,
        what="a phase",
    )["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Unsupported"
    assert "spec.gpu" in ready["message"] and "spec.corex" in ready["message"]
    assert "nodeName" not in status  # nothing was placed or deployed
    cluster.kubectl("delete", "-n", ns, "zm", "gpu-box", "--wait=true", "--timeout=60s")
