"""End to end: the real API server, the controller and two agents booting QEMU/TCG guests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hack.controlplane import ControlPlane, free_port, virtiofsd_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_busybox_flist, agent_guest_dir, agent_pki
from tests.netns import bridged_netns

__all__ = ["agent_busybox_flist", "agent_guest_dir", "agent_pki"]

NODES = {"node-a": "10.233.1.0/24", "node-b": "10.233.2.0/24"}


@pytest.fixture(scope="module")
def e2e_netns() -> Iterator[str]:
    """One namespace with one bridge; each node hands out addresses from its own /24."""
    with bridged_netns("zme2e", "zmbr0", "10.233.0.1/16") as name:
        yield name


@dataclass
class Fleet:
    cluster: ControlPlane
    agents: dict[str, AgentProcess]
    controller: subprocess.Popen[bytes]
    controller_log: Path
    flist: Path
    ns: str

    def kubectl(self, *args: str, input: str | None = None) -> str:
        """kubectl in the fleet's namespace, failing the test on error."""
        return self.cluster.kubectl("-n", self.ns, *args, input=input).stdout

    def get(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get("zm", name, self.ns)


def node_agent(
    name: str,
    cluster: ControlPlane,
    base: Path,
    pki: Path,
    netns: str,
    guest_dir: Path,
    flist_dir: Path,
) -> AgentProcess:
    agent = AgentProcess(base / name, pki, [])
    agent.extra = [
        "--node-name", name, "--cidr", NODES[name], "--bridge", "zmbr0", "--netns", netns,
        "--guest-kernel-dir", str(guest_dir), "--flist-dir", str(flist_dir),
        "--kubeconfig", str(cluster.kubeconfig), "--advertise-address", agent.address,
        "--lease-namespace", "zmachine-system", "--virtiofsd", str(virtiofsd_path()),
    ]  # fmt: skip
    return agent


def start_controller(
    cluster: ControlPlane, pki: Path, ns: str, log: Path
) -> subprocess.Popen[bytes]:
    """The controller, watching ``ns`` only, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.operator.main",
             "--agent-tls-dir", str(pki), "--metrics-port", str(free_port()),
             "--health-port", str(free_port()), "--delete-timeout", "60",
             "--namespace", ns, "--lease-namespace", ns],
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(
    cluster: ControlPlane,
    ns: str,
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_busybox_flist: Path,
    e2e_netns: str,
) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("e2e")
    agents = {
        name: node_agent(
            name, cluster, base, agent_pki, e2e_netns, agent_guest_dir, agent_busybox_flist.parent
        )
        for name in NODES
    }
    log = base / "controller.log"
    controller = start_controller(cluster, agent_pki, ns, log)
    try:
        for agent in agents.values():
            agent.start()
        yield Fleet(cluster, agents, controller, log, agent_busybox_flist, ns)
    finally:
        controller.terminate()
        controller.wait(30)
        for agent in agents.values():
            # VMs outlive their agent by design: a failed test must not leave them running.
            with contextlib.suppress(Exception):
                agent.delete_all()
            agent.stop()
