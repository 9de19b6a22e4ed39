"""Scale benchmark: many Zmachines on one control plane, measured end to end.

Run as root: ``.venv/bin/python -m tests.bench scale --objects N --nodes M --rate R --json PATH``.
The real kube-apiserver (hack/controlplane.py), the real controller and M real agents, each
with its own state directory and port, on this machine; the VMM is the stand-in
(tests/bench/standin_vmm.c: starts at once, answers cloud-hypervisor's API, runs no guest),
so what is measured is the control plane and the agents' own work, not guest boots.

Phases: one apply of N Zmachines until all are Running; a minute at rest; delete all; then
creations at a steady R per second (creation to Running per object). API writes come from
kube-apiserver's own ``apiserver_request_total`` (mutating verbs), split by resource.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

from controller.agent.rpc.tls import write_dev_pki
from controller.flist.pack import pack
from controller.kube import api_client
from hack.controlplane import (
    ControlPlane,
    free_port,
    guest_kernel_dir,
    standin_vmm_path,
    virtiofsd_path,
)
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import guest_busybox_root
from tests.bench.report import write_section
from tests.netns import bridged_netns

NS = "scale"
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
GROUP, VERSION, PLURAL = "zos.threefold.io", "v1alpha1", "zmachines"
MEMORY = "256Mi"  # the smallest memory admission takes (250Mi) rounded up
# The stand-in allocates no guest memory; each agent hands out this much.
PRETEND_MEMORY = 4 << 40


def _proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status figure in MiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_component(controller: int, agents: set[int]) -> dict[str, float]:
    """Host CPU seconds so far, by component, from every process in /proc. An agent's
    figure includes the short-lived commands it ran and waited for (mkfs, mount, ip...);
    the VMs' own processes are counted apart."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        pid, own = int(entry.name), int(fields[11]) + int(fields[12])
        waited = int(fields[13]) + int(fields[14])
        exe = os.path.basename(argv[0].decode(errors="replace"))
        if pid == controller:
            kind = "controller"
        elif pid in agents:
            kind, own = "agents", own + waited
        elif exe in ("kube-apiserver", "etcd", "virtiofsd"):
            kind = exe
        elif "standin" in exe:
            kind = "vmm"
        elif argv[1:4] == [b"-m", b"controller.flist.cli", b"mount"]:
            kind = "flist-mount"
        else:
            continue
        out[kind] = out.get(kind, 0.0) + own / tick
    return out


def api_writes(cluster: ControlPlane, detail: bool = False) -> dict[str, float]:
    """Mutating requests served so far, by resource (subresources counted with it), or
    with ``detail`` by verb and resource/subresource (``PATCH zmachines/status``)."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(
            part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(",")
        )
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "")
            if detail:
                sub = labels.get("subresource", "")
                resource = f"{labels['verb']} {resource}{'/' + sub if sub else ''}"
            out[resource] = out.get(resource, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def per_zmachine(delta: dict[str, float]) -> float:
    """What a Zmachine costs: writes to Zmachines and their Events (Leases and
    ZmachineNodes are the nodes' own heartbeat, reported apart)."""
    return delta.get("zmachines", 0.0) + delta.get("events", 0.0)


@dataclass
class PhaseWatch:
    """A watch on the namespace, in a thread: when each Zmachine was first seen, first
    Running, and gone, by this process's clock."""

    api: client.ApiClient
    seen: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        version = ""
        while not self.stop.is_set():
            w = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for ev in w.stream(  # type: ignore[no-untyped-call]
                    custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                    resource_version=version, timeout_seconds=60,
                ):  # fmt: skip
                    obj = ev["object"]
                    name = obj["metadata"]["name"]
                    version = obj["metadata"]["resourceVersion"]
                    now = time.monotonic()
                    with self.lock:
                        self.seen.setdefault(name, now)
                        if ev["type"] == "DELETED":
                            self.gone[name] = now
                        elif (obj.get("status") or {}).get("phase") == "Running":
                            self.running.setdefault(name, now)
                    if self.stop.is_set():
                        break
            except client.ApiException as exc:
                if exc.status == 410:
                    version = ""
            except Exception:  # the stream broke: watch again from where it was
                time.sleep(0.2)

    def count(self, names: list[str], what: dict[str, float]) -> int:
        with self.lock:
            return sum(1 for n in names if n in what)


def manifest(name: str, flist: Path) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Zmachine",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "flist": f"file://{flist}",
            "computeCapacity": {"cpu": 1, "memory": MEMORY},
            "entrypoint": "/bin/sh -c 'sleep 3600'",
        },
    }


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ", 1)[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def environment(
    work: Path, nodes: int
) -> Iterator[tuple[ControlPlane, dict[str, AgentProcess], Path, Path]]:
    """Control plane, CRDs, namespace, PKI, a busybox flist and `nodes` stand-in agents."""
    cluster = ControlPlane(work / "cp")
    cluster.start()
    agents: dict[str, AgentProcess] = {}
    try:
        repo = Path(__file__).resolve().parents[2]
        cluster.kubectl("apply", "--server-side", "-f", str(repo / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        cluster.kubectl("create", "namespace", NS)
        pki = work / "pki"
        write_dev_pki(pki)
        flist = work / "flists" / "busybox.fl"
        flist.parent.mkdir()
        pack(guest_busybox_root(work / "root"), flist, [f"dir://{work / 'store'}"])
        standin_vmm = standin_vmm_path()
        with bridged_netns("zmscl", "zmbr0", "10.200.0.1/16") as netns:
            for i in range(nodes):
                name = f"scale-{i}"
                # A bridge per node: a Linux bridge takes at most 1,024 ports (taps).
                if i:
                    for cmd in (["add", f"zmbr{i}", "type", "bridge"], ["set", f"zmbr{i}", "up"]):
                        subprocess.run(["ip", "-n", netns, "link", *cmd], check=True)
                agent = AgentProcess(work / name, pki, [])
                agent.extra = [
                    "--node-name", name, "--cidr", f"10.200.{16 * (i + 1)}.0/20",
                    "--bridge", f"zmbr{i}", "--netns", netns,
                    "--guest-kernel-dir", str(guest_kernel_dir()),
                    "--flist-dir", str(flist.parent),
                    "--kubeconfig", str(cluster.kubeconfig),
                    "--advertise-address", agent.address, "--lease-namespace", NS,
                    "--virtiofsd", str(virtiofsd_path()),
                    "--hypervisor", "cloud-hypervisor", "--vmm-binary", str(standin_vmm),
                    "--memory-capacity", str(PRETEND_MEMORY),
                    "--monitor-interval", "2",
                ]  # fmt: skip
                agents[name] = agent
                agent.start()
            try:
                yield cluster, agents, pki, flist
            finally:
                for agent in agents.values():
                    with contextlib.suppress(Exception):
                        agent.delete_all()
                    agent.stop()
    finally:
        cluster.stop()


def start_controller(
    cluster: ControlPlane, pki: Path, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "controller.operator.main",
                "--agent-tls-dir", str(pki), "--metrics-port", str(port),
                "--health-port", str(free_port()), "--namespace", NS, "--lease-namespace", NS,
                "--log-level", "WARNING",
                # Stand-in VMs use no CPU: let vCPUs, not this 2-core host, bound placement.
                "--cpu-allocation-ratio", "5000",
            ],
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, port


def measure(
    work: Path, objects: int, nodes: int, rate: float, idle: float, steady_count: int
) -> dict[str, Any]:
    with environment(work, nodes) as (cluster, agents, pki, flist):
        controller, metrics_port = start_controller(cluster, pki, work / "controller.log")
        api = api_client(str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(api)
        phases = PhaseWatch(api)
        phases.start()
        try:
            # Warm-up: every node placed on and Running once (Leases seen renewed).
            probes = [f"probe-{i}" for i in range(nodes)]
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
                [manifest(n, flist) for n in probes]))  # fmt: skip
            wait(lambda: phases.count(probes, phases.running) == len(probes), 180, "the probes")
            cluster.kubectl("-n", NS, "delete", "zm", *probes, "--wait=true")
            time.sleep(2)
            agent_rss0 = {n: _proc_status(a.proc.pid, "VmRSS") for n, a in agents.items() if a.proc}

            # 1. One apply of N.
            names = [f"zm-{i:05d}" for i in range(objects)]
            before = api_writes(cluster)
            before_detail = api_writes(cluster, detail=True)
            agent_pids = {a.proc.pid for a in agents.values() if a.proc}
            cpu0 = cpu_by_component(controller.pid, agent_pids)
            started = time.monotonic()
            docs = yaml.safe_dump_all([manifest(n, flist) for n in names])
            cluster.kubectl("apply", "-f", "-", input=docs)
            all_running = (
                wait(
                    lambda: phases.count(names, phases.running) == objects, 1800, "all Running", 1.0
                )
                + 0.0
            )
            all_running = max(phases.running[n] for n in names) - started
            burst_cpu = _delta(cpu_by_component(controller.pid, agent_pids), cpu0)
            time.sleep(5)  # the last Events and status writes land
            burst = _delta(api_writes(cluster), before)
            burst_detail = _delta(api_writes(cluster, detail=True), before_detail)
            agent_rss1 = {n: _proc_status(a.proc.pid, "VmRSS") for n, a in agents.items() if a.proc}

            # 2. At rest.
            text0 = _scrape(metrics_port)
            before = api_writes(cluster)
            time.sleep(idle)
            rest = _delta(api_writes(cluster), before)
            text1 = _scrape(metrics_port)
            idle_gets = metric(
                text1, "zmachine_agent_call_duration_seconds_count", method="Get"
            ) - metric(text0, "zmachine_agent_call_duration_seconds_count", method="Get")

            # 3. Delete all.
            started = time.monotonic()
            cluster.kubectl("-n", NS, "delete", "zm", "--all", "--wait=false")
            wait(lambda: phases.count(names, phases.gone) == objects, 1800, "all deleted", 1.0)
            delete_all = max(phases.gone[n] for n in names) - started

            # 4. A steady rate.
            steady = [f"st-{i:05d}" for i in range(steady_count or min(objects, int(rate * 30)))]
            sent: dict[str, float] = {}
            t0 = time.monotonic()
            for i, name in enumerate(steady):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent[name] = time.monotonic()
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, NS, PLURAL, manifest(name, flist)
                )
            wait(lambda: phases.count(steady, phases.running) == len(steady), 900, "steady Running")
            latencies = sorted(phases.running[n] - sent[n] for n in steady)
            cluster.kubectl("-n", NS, "delete", "zm", "--all", "--wait=false")
            wait(lambda: phases.count(steady, phases.gone) == len(steady), 900, "steady deleted")

            peak = _proc_status(controller.pid, "VmHWM")
            cpu = _cpu_seconds(controller.pid)
        finally:
            phases.stop.set()
            controller.terminate()
            controller.wait(60)

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    per_agent = objects / nodes
    growth = [(agent_rss1[n] - agent_rss0[n]) / per_agent for n in agent_rss0 if n in agent_rss1]
    return {
        "objects": objects,
        "nodes": nodes,
        "rate": rate,
        "all_running_s": round(all_running, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(q(0.95), 3),
        "p99_s": round(q(0.99), 3),
        "api_writes_per_zmachine": round(per_zmachine(burst) / objects, 2),
        "idle_writes_per_zmachine_per_min": round(per_zmachine(rest) / objects * 60 / idle, 4),
        "controller_peak_rss_mib": round(peak, 1),
        "controller_cpu_s": round(cpu, 1),
        "agent_rss_mib_per_vm": round(statistics.mean(growth), 3),
        "delete_all_s": round(delete_all, 2),
        # Context for the figures above.
        "burst_cpu_s_by_component": {k: round(v, 1) for k, v in burst_cpu.items()},
        "burst_writes_by_resource": burst,
        "burst_writes_by_request": burst_detail,
        "idle_writes_by_resource": rest,
        "idle_agent_get_rpcs": idle_gets,
        "idle_seconds": idle,
        "steady_objects": len(steady),
    }


TARGETS = {
    "all_running_s": ("one apply → all Running (s)", "≤ 30 at 1,000 on 4 nodes"),
    "p50_s": ("creation → Running at a steady rate, p50 (s)", "≤ 0.5 at 20/s"),
    "p95_s": ("creation → Running at a steady rate, p95 (s)", ""),
    "p99_s": ("creation → Running at a steady rate, p99 (s)", "≤ 2 at 20/s"),
    "api_writes_per_zmachine": ("API writes per Zmachine, creation → Running", "≤ 6"),
    "idle_writes_per_zmachine_per_min": ("writes per idle Zmachine per minute", "≤ 0.2"),
    "controller_peak_rss_mib": ("controller peak RSS (MiB)", "≤ 200 at 5,000"),
    "controller_cpu_s": ("controller CPU, whole run (s)", ""),
    "agent_rss_mib_per_vm": ("agent RSS growth per VM (MiB)", "≤ 2"),
    "delete_all_s": ("delete all, from one delete to all gone (s)", ""),
}


def table(runs: list[dict[str, Any]]) -> str:
    head = "| figure | target | " + " | ".join(
        f"{r['objects']} objects, {r['nodes']} nodes, {r['rate']:g}/s" for r in runs
    )
    lines = [head + " |", "|---|---|" + "---|" * len(runs)]
    for key, (what, target) in TARGETS.items():
        lines.append(f"| {what} | {target} | " + " | ".join(str(r[key]) for r in runs) + " |")
    return "\n".join(lines)


def section(runs: list[dict[str, Any]]) -> str:
    commands = "; ".join(
        f"`.venv/bin/python -m tests.bench scale --objects {r['objects']} --nodes {r['nodes']} "
        f"--rate {r['rate']:g} --write`"
        for r in runs
    )
    detail = "\n".join(
        f"- {r['objects']} objects: writes by request, apply to all Running "
        f"{json.dumps(r['burst_writes_by_request'])}; at rest over {r['idle_seconds']:.0f} s "
        f"{json.dumps(r['idle_writes_by_resource'])}; agent Get RPCs at rest "
        f"{r['idle_agent_get_rpcs']:.0f}; host CPU seconds from the apply to all Running, by "
        f"component, {json.dumps(r['burst_cpu_s_by_component'])}"
        for r in runs
    )
    return f"""## Scale

Command (as root): {commands}. On {platform.node()} ({os.cpu_count()} cores, shared with
other work), real kube-apiserver and etcd, the real controller and real agents with the
stand-in VMM (no guest runs: this is the control plane's and the agents' own cost). Writes
are kube-apiserver's `apiserver_request_total` for POST/PUT/PATCH/DELETE on Zmachines and
Events (the create itself included); the nodes' Lease and ZmachineNode heartbeats are listed
apart below.

{table(runs)}

{detail}
"""


UNSHARED = "ZM_BENCH_PRIVATE_MOUNTS"


def in_private_mounts(module: list[str], argv: list[str]) -> None:
    """Run `python -m *module *argv` again in a mount namespace of its own, private: the
    FUSE, overlay and loop mounts of many VMs never propagate into another namespace, where
    a copy would keep a deleted VM's loop device attached (seen with a second control plane
    in its own namespace on this machine). Returns only inside that namespace."""
    if os.environ.get(UNSHARED) == "1":
        return
    unshare = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m"]
    os.execvpe("unshare", [*unshare, *module, *argv], {**os.environ, UNSHARED: "1"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[2:] if argv is None else argv
    in_private_mounts(["tests.bench", "scale"], argv)
    parser = argparse.ArgumentParser(prog="python -m tests.bench scale", description=__doc__)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds at rest to count")
    parser.add_argument(
        "--steady", type=int, default=0, help="creations at --rate (default: 30 s worth)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zm-scale-") as tmp:
        figures = measure(Path(tmp), args.objects, args.nodes, args.rate, args.idle, args.steady)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(table([figures]))
    if args.write:
        write_section("Scale", section([figures]))
