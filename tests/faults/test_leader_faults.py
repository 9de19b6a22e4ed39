"""Leadership under faults, judged from the API server's side (its audit log).

A control plane of this module's own: it logs every write with the user that made it (each
controller authenticates with a client certificate of its own), and its kube-apiserver is
stopped and started again while etcd keeps the data.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from controller.kube import GROUP, VERSION, api_client
from controller.operator.leader import LEASE_NAME, LOST_LEADERSHIP_EXIT
from hack.controlplane import ControlPlane, free_port
from tests.agent.agent_harness import AgentProcess
from tests.api.test_admission import valid_manifest
from tests.conftest import REPO
from tests.faults.invariants import leaks
from tests.operator.conftest import RunningController, start_controller, wait_for

pytestmark = pytest.mark.faults

NS = "leader-faults"
# Short enough for a test, with client-go's proportions (renewDeadline < leaseDuration).
SHORT_LEASE = ("--leader-elect-lease-duration=6", "--leader-elect-renew-deadline=4",
               "--leader-elect-retry-period=1")  # fmt: skip
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("audited"), audit=True)
    cp.start()
    try:
        cp.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        cp.kubectl("create", "namespace", NS)
        yield cp
    finally:
        cp.stop()


def writes_by(plane: ControlPlane, user: str) -> list[dict[str, Any]]:
    return [
        e for e in plane.audit_events() if e["user"]["username"] == user and e["verb"] in WRITES
    ]


class FlappingNode:
    """A ZmachineNode whose agent keeps reporting Ready while never renewing its Lease: the
    leading controller marks it not Ready on every resync, so a controller that acts at
    all writes within a resync period. (A stand-in for an agent, made by the test.)"""

    def __init__(self, plane: ControlPlane, name: str) -> None:
        self.name = name
        self.custom = client.CustomObjectsApi(api_client(str(plane.kubeconfig)))
        self._stop = threading.Event()
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ZmachineNode",
            "metadata": {"name": name},
            "spec": {"address": f"127.0.0.1:{free_port()}", "leaseNamespace": NS},
        }
        self.custom.create_cluster_custom_object(GROUP, VERSION, "zmachinenodes", body)
        self._thread = threading.Thread(target=self._run, name="flapping-node", daemon=True)

    def _run(self) -> None:
        ready = {"type": "Ready", "status": "True", "reason": "AgentReady", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
        status = {"status": {"allocatable": {"cpu": 8, "memory": "16Gi"}, "conditions": [ready]}}
        while not self._stop.wait(0.5):
            self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, "zmachinenodes", self.name, status
            )

    def __enter__(self) -> FlappingNode:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        # kopf's finalizer stays (its controllers are gone): the node is this module's only.
        self.custom.delete_cluster_custom_object(GROUP, VERSION, "zmachinenodes", self.name)


def controller_as(plane: ControlPlane, user: str, log: Path, *flags: str) -> RunningController:
    kubeconfig = plane.user_kubeconfig(user, ["system:masters"])
    return start_controller(plane, NS, log, *flags, kubeconfig=kubeconfig)


def test_a_leader_thawed_after_its_lease_writes_nothing_once_the_standby_leads(
    plane: ControlPlane, tmp_path: Path
) -> None:
    old_user, new_user = "controller-frozen", "controller-standby"
    with FlappingNode(plane, "flappy"):
        old = controller_as(plane, old_user, tmp_path / "old.log", *SHORT_LEASE)
        new = None
        try:
            wait_for(lambda: "became leader" in old.log.read_text(), what="the first leader")
            # It acts: it marks the node not Ready (and posts events) every resync.
            wait_for(lambda: writes_by(plane, old_user), what="a write by the leader")
            new = controller_as(plane, new_user, tmp_path / "new.log", *SHORT_LEASE)
            wait_for(lambda: new.healthz() == "standby\n", what="a live standby")

            os.kill(old.process.pid, signal.SIGSTOP)
            wait_for(lambda: "became leader" in new.log.read_text(), timeout=60,
                     what="the standby to take over")  # fmt: skip
            wait_for(lambda: len(writes_by(plane, new_user)) > 3, what="the new leader to act")
            time.sleep(2)  # the old leader's resync timers are now overdue
            os.kill(old.process.pid, signal.SIGCONT)
            code = old.process.wait(timeout=60)
            wait_for(lambda: len(writes_by(plane, new_user)) > 6, what="the new leader to go on")
        finally:
            if old.process.poll() is None:
                os.kill(old.process.pid, signal.SIGCONT)
                old.stop()
            if new is not None:
                new.stop()
    took_over = min(e["requestReceivedTimestamp"] for e in writes_by(plane, new_user))
    late = [
        f"{e['requestReceivedTimestamp']} {e['verb']} {e['requestURI']}"
        for e in writes_by(plane, old_user)
        if e["requestReceivedTimestamp"] >= took_over
    ]
    assert not late, f"the old leader wrote after the standby's first write ({took_over}): {late}"
    assert code == LOST_LEADERSHIP_EXIT, old.log.read_text()[-3000:]


LONG_LEASE = ("--leader-elect-lease-duration=90", "--leader-elect-renew-deadline=60",
              "--leader-elect-retry-period=2")  # fmt: skip


def node_ready(plane: ControlPlane, name: str) -> bool:
    node = plane.get("zmn", name) or {}
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def lease_renewals(plane: ControlPlane, name: str, user: str) -> list[str]:
    """When `user` wrote the Lease `name` (creates and renewals), per the audit log."""
    return [
        e["requestReceivedTimestamp"]
        for e in writes_by(plane, user)
        if e["objectRef"].get("resource") == "leases" and e["objectRef"].get("name") == name
    ]


def test_controller_and_agent_ride_out_an_api_server_restart(
    plane: ControlPlane, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """kube-apiserver stops and starts again (etcd keeps the data): the same controller and
    agent processes reconnect: the leader keeps its Lease (the outage is shorter than the
    renew deadline), handles a Zmachine created afterwards, and the agent's heartbeat
    resumes, so its node is Ready again."""
    leader_user, agent_user = "controller-steady", "agent-steady"
    state = tmp_path_factory.mktemp("steady") / "agent"  # short: the state dir has a budget
    agent = AgentProcess(
        state, tmp_path / "no-pki",
        ["--kubeconfig", str(plane.user_kubeconfig(agent_user, ["system:masters"])),
         "--lease-namespace", NS, "--node-name", "steady"],
        insecure=True,
    )  # fmt: skip
    leader = controller_as(plane, leader_user, tmp_path / "leader.log", *LONG_LEASE)
    try:
        with agent.running():
            wait_for(lambda: "became leader" in leader.log.read_text(), what="a leader")
            wait_for(lambda: node_ready(plane, "steady"), what="the agent's node to be Ready")
            # kopf serves the resources (its discovery is done): it publishes the node's usage.
            wait_for(
                lambda: any(
                    e["objectRef"].get("resource") == "zmachinenodes"
                    for e in writes_by(plane, leader_user)
                ),
                what="the leader to act on the node",
            )
            pids = (leader.process.pid, agent.proc.pid if agent.proc else None)
            held = (plane.get("lease", LEASE_NAME, NS) or {})["spec"]

            plane.stop_apiserver()
            time.sleep(8)  # several failed renewals and heartbeats
            plane.start_apiserver()
            restarted = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

            manifest = valid_manifest("after-restart", NS)
            manifest["spec"]["computeCapacity"]["cpu"] = 64  # no node fits: Pending
            plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
            wait_for(
                lambda: ((plane.get("zm", "after-restart", NS) or {}).get("status") or {}).get(
                    "phase"
                ),
                timeout=90,
                what="the controller to handle a Zmachine created after the restart",
            )
            wait_for(
                lambda: any(t > restarted for t in lease_renewals(plane, "zmachine-node-steady",
                                                                  agent_user)),
                timeout=60,
                what="the agent to renew its heartbeat Lease after the restart",
            )  # fmt: skip
            wait_for(lambda: node_ready(plane, "steady"), timeout=60, what="the node Ready")
            wait_for(
                lambda: any(t > restarted for t in lease_renewals(plane, LEASE_NAME,
                                                                  leader_user)),
                what="the leader to renew its Lease after the restart",
            )  # fmt: skip
            assert leader.process.poll() is None, leader.log.read_text()[-3000:]
            assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()
            assert (leader.process.pid, agent.proc.pid) == pids
            # Leadership was never lost: one acquisition, and the Lease still names it.
            assert leader.log.read_text().count("became leader") == 1
            lease = (plane.get("lease", LEASE_NAME, NS) or {})["spec"]
            assert lease["holderIdentity"] == held["holderIdentity"]
            assert lease.get("leaseTransitions") == held.get("leaseTransitions")
            plane.kubectl("delete", "zm", "-n", NS, "after-restart", "--wait=true")
    finally:
        # While the controller still runs: kopf holds a finalizer on nodes it runs timers for.
        plane.kubectl("delete", "zmn", "steady", "--ignore-not-found", "--timeout=60s",
                      check=False)  # fmt: skip
        leader.stop()
    assert leaks([state]) == []


def test_a_controller_started_while_the_api_server_is_away_serves_once_it_returns(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """kopf resolves its resources once at start; the controller holds that start until
    the API server's discovery answers, so an outage then cannot leave it serving nothing."""
    log = tmp_path / "controller.log"
    plane.stop_apiserver()
    controller = None
    try:
        controller = start_controller(plane, NS, log, "--no-leader-election")
        # kopf's start-up activities (ours set its timeouts) run before it looks at the API.
        wait_for(
            lambda: "Activity 'network_timeouts' succeeded" in log.read_text(),
            what="kopf to start while the API server is away",
        )
        time.sleep(3)
    finally:
        plane.start_apiserver()
    try:
        manifest = valid_manifest("started-blind", NS)
        manifest["spec"]["computeCapacity"]["cpu"] = 64  # no node fits: Pending
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        wait_for(
            lambda: ((plane.get("zm", "started-blind", NS) or {}).get("status") or {}).get("phase"),
            timeout=90,
            what="the controller to handle a Zmachine",
            on_timeout=lambda: log.read_text()[-3000:],
        )
        plane.kubectl("delete", "zm", "-n", NS, "started-blind", "--timeout=60s")
    finally:
        if controller is not None:
            controller.stop()
