"""Controller benchmark: how fast it takes on many Zmachines, and how quiet it is at rest.

Run: ``.venv/bin/python -m tests.bench.controller_bench [--objects 100] [--idle 60] [--write]``.
A real kube-apiserver and the real controller; no node is registered, so every Zmachine ends
Pending/Unschedulable: this measures the controller's own path (watch, reconcile, placement,
status patch, events), not the agents'. At rest it counts every write to the objects
(resourceVersion changes seen by a watch), which is what a fleet of idle Zmachines costs the
API server.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from hack.controlplane import ControlPlane
from tests.api.test_admission import valid_manifest
from tests.bench.report import write_section
from tests.operator.conftest import start_controller, wait_for

NS = "bench"
REPO = Path(__file__).resolve().parents[2]


def phases(cluster: ControlPlane) -> list[str | None]:
    items = json.loads(cluster.kubectl("get", "zm", "-n", NS, "-o", "json").stdout)["items"]
    return [(i.get("status") or {}).get("phase") for i in items]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(work: Path, objects: int, idle: float) -> dict[str, float]:
    cluster = ControlPlane(work / "cp")
    cluster.start()
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        cluster.kubectl("create", "namespace", NS)
        controller = start_controller(cluster, NS, work / "controller.log")
        try:
            wait_for(controller.healthz, timeout=60, what="the controller")
            idle_rss = rss_mib(controller.process.pid)
            docs = [valid_manifest(f"bench-{i:04d}", NS) for i in range(objects)]
            started = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
            applied = time.monotonic() - started
            wait_for(lambda: all(phases(cluster)), timeout=600, interval=0.5,
                     what="every Zmachine to get a phase")  # fmt: skip
            handled = time.monotonic() - started
            busy_rss = rss_mib(controller.process.pid)
            time.sleep(10)  # let the last events and status patches land
            watch = subprocess.Popen(
                [str(cluster.assets / "kubectl"), f"--kubeconfig={cluster.kubeconfig}",
                 "get", "zm", "-n", NS, "--watch-only", "-o", "name"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(idle)
            watch.terminate()
            writes = len((watch.communicate()[0] or "").splitlines())
        finally:
            controller.stop()
    finally:
        cluster.stop()
    return {
        "objects": objects,
        "apply_s": applied,
        "all_reconciled_s": handled,
        "per_second": objects / handled,
        "idle_writes_per_object_minute": writes / objects * 60 / idle,
        "idle_rss_mib": idle_rss,
        "busy_rss_mib": busy_rss,
    }


def section(f: dict[str, float], idle: float) -> str:
    n = int(f["objects"])
    rows = [
        (f"{n} Zmachines applied in one `kubectl apply`", f"{f['apply_s']:.1f} s"),
        (
            f"all {n} with a phase, from the apply",
            f"{f['all_reconciled_s']:.1f} s ({f['per_second']:.1f} per second)",
        ),
        (
            "writes to the objects at rest",
            f"{f['idle_writes_per_object_minute']:.2f} per Zmachine per minute",
        ),
        (
            f"controller memory (RSS), no objects / {n} objects",
            f"{f['idle_rss_mib']:.0f} / {f['busy_rss_mib']:.0f} MiB",
        ),
    ]
    table = "\n".join(f"| {what} | {figure} |" for what, figure in rows)
    return f"""## Controller

Command (as root): `.venv/bin/python -m tests.bench.controller_bench --objects {n} --idle \
{idle:.0f} --write`. One run against the real kube-apiserver on the 2-core dev machine, no node
registered (every Zmachine ends Pending/Unschedulable), so this is the controller's own path:
watch, reconcile, placement, status patch and events; idle writes counted by a watch over
{idle:.0f} s.

| what | figure |
|---|---|
{table}

At rest nothing is reconciled but the jittered safety net (each Zmachine once per 300 s), which
patches only what changed, so an idle fleet costs the API server nothing.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to count idle writes")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp), args.objects, args.idle)
    text = section(figures, args.idle)
    print(text)
    if args.write:
        write_section("Controller", text)


if __name__ == "__main__":
    main()
