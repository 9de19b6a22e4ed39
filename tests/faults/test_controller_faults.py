"""The controller and the agents broken mid-work, with the real API server and real agents.

The VMM is the stand-in (tests/bench/standin_vmm.c): what is tested here is placement,
deployment and deletion under faults, which does not depend on a guest booting, and 100
QEMU guests would not fit this machine. Every test runs under the one-VMM-per-uid sampler;
the module ends with the leak check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack.controlplane import ControlPlane, free_port, standin_vmm_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_busybox_flist, agent_guest_dir, agent_pki
from tests.e2e.conftest import NODES, node_agent
from tests.faults.invariants import OneVmmPerUid, leaks, vmm_pids_by_uid
from tests.netns import bridged_netns
from tests.operator.conftest import wait_for

__all__ = ["agent_busybox_flist", "agent_guest_dir", "agent_pki"]
pytestmark = [pytest.mark.faults, pytest.mark.fuse]

BURST = int(os.environ.get("ZM_FAULT_BURST", "50"))


@dataclass
class Fleet:
    cluster: ControlPlane
    ns: str
    agents: dict[str, AgentProcess]
    pki: Path
    flist: Path
    log: Path
    controller: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0

    def start_controller(self) -> None:
        self.metrics_port = free_port()
        with self.log.open("ab") as out:
            self.controller = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller.operator.main",
                    "--agent-tls-dir",
                    str(self.pki),
                    "--metrics-port",
                    str(self.metrics_port),
                    "--health-port",
                    str(free_port()),
                    "--delete-timeout",
                    "120",
                    "--orphan-grace",
                    "10",
                    # Stand-in VMs use no CPU: fit 50 one-vCPU machines on two 2-core nodes.
                    "--cpu-allocation-ratio",
                    "30",
                    "--namespace",
                    self.ns,
                    "--lease-namespace",
                    self.ns,
                ],
                env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGKILL)
        self.controller.wait(10)

    def stop_controller(self) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.terminate()
            self.controller.wait(30)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl("-n", self.ns, *args, input=input).stdout

    def zmachines(self) -> dict[str, dict[str, Any]]:
        items = json.loads(self.kubectl("get", "zm", "-o", "json"))["items"]
        return {i["metadata"]["name"]: i for i in items}

    def apply(self, names: list[str]) -> None:
        docs = [
            {
                "apiVersion": "zos.threefold.io/v1alpha1",
                "kind": "Zmachine",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {
                    "flist": f"file://{self.flist}",
                    "computeCapacity": {"cpu": 1, "memory": "256Mi"},
                    "entrypoint": "/bin/sh -c 'sleep 3600'",
                },
            }
            for name in names
        ]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def state_dirs(self) -> list[Path]:
        return [a.state_dir for a in self.agents.values()]

    def diagnose(self) -> str:
        phases: dict[str, list[str]] = {}
        for name, obj in self.zmachines().items():
            status = obj.get("status") or {}
            phases.setdefault(f"{status.get('phase')}: {status.get('message')}", []).append(name)
        tail = f"{phases}\n" + self.log.read_text(errors="replace")[-3000:]
        return tail + "".join(a.log_text()[-1500:] for a in self.agents.values())


@pytest.fixture(scope="module")
def fleet(
    cluster: ControlPlane,
    ns: str,
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_busybox_flist: Path,
) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("faults")
    standin = str(standin_vmm_path())
    with bridged_netns("zmflt", "zmbr0", "10.233.0.1/16") as netns:
        agents = {}
        for name in NODES:
            agent = node_agent(
                name, cluster, base, agent_pki, netns, agent_guest_dir, agent_busybox_flist.parent
            )
            agent.extra += ["--hypervisor", "cloud-hypervisor", "--vmm-binary", standin]
            agents[name] = agent
        fleet = Fleet(cluster, ns, agents, agent_pki, agent_busybox_flist, base / "controller.log")
        try:
            for agent in agents.values():
                agent.start()
            fleet.start_controller()
            yield fleet
        finally:
            fleet.stop_controller()
            for agent in agents.values():
                try:
                    agent.delete_all()
                finally:
                    agent.stop()
            found = leaks(fleet.state_dirs(), netns)
            assert found == [], found


def _phases(fleet: Fleet) -> dict[str, str]:
    return {n: (o.get("status") or {}).get("phase", "") for n, o in fleet.zmachines().items()}


def _all_running(fleet: Fleet, names: list[str]) -> bool:
    phases = _phases(fleet)
    return all(phases.get(n) == "Running" for n in names) and len(phases) == len(names)


def test_controller_killed_in_a_burst_of_creations_and_deletions(fleet: Fleet) -> None:
    old = [f"old-{i}" for i in range(BURST)]
    new = [f"new-{i}" for i in range(BURST)]
    with OneVmmPerUid(fleet.state_dirs()).watching(), _deleted_at_the_end(fleet):
        fleet.apply(old)
        wait_for(
            lambda: _all_running(fleet, old),
            timeout=300,
            interval=2,
            what="the first 50 Running",
            on_timeout=fleet.diagnose,
        )
        fleet.apply(new)
        fleet.kubectl("delete", "zm", *old, "--wait=false")
        time.sleep(3)  # mid-burst: some placed, some deployed, some deleting
        fleet.kill_controller()
        time.sleep(2)
        fleet.start_controller()
        wait_for(
            lambda: _all_running(fleet, new),
            timeout=400,
            interval=2,
            what="the new 50 Running and the old 50 gone",
            on_timeout=fleet.diagnose,
        )
        uids = {o["metadata"]["uid"] for o in fleet.zmachines().values()}
        # Orphans of the burst, if any, are removed after the grace period.
        wait_for(
            lambda: set(vmm_pids_by_uid(fleet.state_dirs())) == uids,
            timeout=120,
            interval=2,
            what="exactly one VMM per live Zmachine and none for the deleted",
            on_timeout=fleet.diagnose,
        )
        placed = {o["status"]["nodeName"] for o in fleet.zmachines().values()}
        assert placed == set(NODES)  # spread over both nodes


@contextmanager
def _deleted_at_the_end(fleet: Fleet) -> Iterator[None]:
    """Every Zmachine deleted through the controller, the test passed or not: the API
    server is shared, and 50 leftovers bound to a node would fail the tests after."""
    try:
        yield
    finally:
        fleet.kubectl("delete", "zm", "--all", "--wait=true", "--timeout=300s")
        wait_for(lambda: not vmm_pids_by_uid(fleet.state_dirs()), timeout=60, what="every VMM gone")


def _agent_calls(fleet: Fleet) -> dict[str, float]:
    """The controller's calls to agents so far, by method (its /metrics)."""
    url = f"http://127.0.0.1:{fleet.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    calls: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("zmachine_agent_call_duration_seconds_count{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            calls[method] = float(line.rsplit(" ", 1)[1])
    return calls


def test_state_changes_are_pushed_and_rest_costs_no_calls(fleet: Fleet) -> None:
    """At rest the controller asks the agents nothing and writes nothing; a change on the
    node reaches the status at once, far inside the safety-net period (300 s here)."""
    with OneVmmPerUid(fleet.state_dirs()).watching():
        fleet.apply(["pushed"])
        wait_for(
            lambda: _phases(fleet).get("pushed") == "Running",
            timeout=120, what="pushed Running", on_timeout=fleet.diagnose,
        )  # fmt: skip
        time.sleep(3)  # the Booted event and its status write
        version = fleet.zmachines()["pushed"]["metadata"]["resourceVersion"]
        calls = _agent_calls(fleet)
        time.sleep(15)
        assert _agent_calls(fleet) == calls  # no Get, Stats or List while nothing happens
        assert fleet.zmachines()["pushed"]["metadata"]["resourceVersion"] == version
        uid = fleet.zmachines()["pushed"]["metadata"]["uid"]
        os.kill(vmm_pids_by_uid(fleet.state_dirs())[uid][0], signal.SIGKILL)
        # The agent restarts the VMM and says so on its stream; the controller writes it.
        wait_for(
            lambda: fleet.zmachines()["pushed"]["status"].get("restartCount") == 1,
            timeout=30, what="the restart in status", on_timeout=fleet.diagnose,
        )  # fmt: skip
        assert _agent_calls(fleet).get("Get", 0) == calls.get("Get", 0)
        fleet.kubectl("delete", "zm", "pushed", "--wait=true", "--timeout=120s")


def test_stopped_agent_goes_unknown_and_returns_with_the_same_vm(fleet: Fleet) -> None:
    with OneVmmPerUid(fleet.state_dirs()).watching():
        fleet.apply(["steady"])
        wait_for(
            lambda: _phases(fleet).get("steady") == "Running",
            timeout=120,
            what="steady Running",
            on_timeout=fleet.diagnose,
        )
        obj = fleet.zmachines()["steady"]
        uid, node = obj["metadata"]["uid"], obj["status"]["nodeName"]
        pids = vmm_pids_by_uid(fleet.state_dirs())[uid]
        fleet.agents[node].stop()
        wait_for(
            lambda: _phases(fleet).get("steady") == "Unknown", timeout=60, what="steady Unknown"
        )
        wait_for(
            lambda: any(
                c["type"] == "NodeReady" and c["status"] == "False"
                for c in fleet.zmachines()["steady"]["status"]["conditions"]
            ),
            timeout=60,
            what="NodeReady False once the Lease expired",
        )
        assert vmm_pids_by_uid(fleet.state_dirs())[uid] == pids  # the VM runs on, unmanaged
        fleet.agents[node].start()
        wait_for(
            lambda: _phases(fleet).get("steady") == "Running",
            timeout=90,
            what="steady Running again",
            on_timeout=fleet.diagnose,
        )
        assert vmm_pids_by_uid(fleet.state_dirs())[uid] == pids  # adopted, not replaced
        fleet.kubectl("delete", "zm", "steady", "--wait=true", "--timeout=120s")


def test_a_zmachinenode_is_deleted_while_the_controller_is_down(fleet: Fleet) -> None:
    """No finalizer on ZmachineNodes: deleting one never waits for the controller."""
    nodes = json.loads(fleet.cluster.kubectl("get", "zmn", "-o", "json").stdout)["items"]
    assert all(not n["metadata"].get("finalizers") for n in nodes), nodes
    fleet.stop_controller()
    try:
        fleet.cluster.kubectl("delete", "zmn", "node-b", "--timeout=20s")
    finally:
        fleet.start_controller()
    # The agent registers its node again with its next heartbeat.
    wait_for(lambda: fleet.cluster.get("zmn", "node-b"), timeout=60, what="node-b registered again")
