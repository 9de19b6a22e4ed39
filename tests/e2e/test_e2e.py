"""kubectl apply gives a running VM, kubectl delete removes every trace (marker e2e).

One module-scoped fleet: the real kube-apiserver, the controller, two agents (node-a, node-b)
with their own state directories and ports, guests under QEMU/TCG on a bridge in a test netns.
The tests run in order and share the machines they boot, since each boot takes ~15 s.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Fleet
from tests.operator.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.qemu, pytest.mark.fuse]

GREETING = "hello-from-e2e"


def manifest(fleet: Fleet, name: str, **spec: Any) -> str:
    body: dict[str, Any] = {
        "flist": f"file://{fleet.flist}",
        "computeCapacity": {"cpu": 1, "memory": "256Mi"},
        "entrypoint": "/bin/sh -c 'echo zm-test-entry $ZM_GREETING; while :; do sleep 3600; done'",
        "env": [{"name": "ZM_GREETING", "value": GREETING}],
        "network": {"interfaces": [{"network": "zmnet"}]},
    }
    body.update(spec)
    return yaml.safe_dump({
        "apiVersion": "zos.threefold.io/v1alpha1", "kind": "Zmachine",
        "metadata": {"name": name, "namespace": fleet.ns}, "spec": body,
    })  # fmt: skip


def status(fleet: Fleet, name: str) -> dict[str, Any]:
    obj = fleet.get(name)
    return (obj or {}).get("status") or {}


def wait_phase(fleet: Fleet, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        if fleet.controller.poll() is not None:
            raise AssertionError(f"controller died:\n{fleet.controller_log.read_text()[-3000:]}")
        current = status(fleet, name)
        return current if current.get("phase") == phase else None

    try:
        return wait_for(check, timeout=timeout, interval=1, what=f"{name} to be {phase}")
    except AssertionError:
        print(fleet.controller_log.read_text()[-4000:])
        for agent in fleet.agents.values():
            print(agent.log_text())
        raise


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions", []) if c["type"] == type_)


def uid_of(fleet: Fleet, name: str) -> str:
    obj = fleet.get(name)
    assert obj is not None
    return str(obj["metadata"]["uid"])


def vm_pids(uid: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{uid}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_nodes_register_with_capacity(fleet: Fleet) -> None:
    def both_ready() -> bool:
        out = json.loads(fleet.cluster.kubectl("get", "zmn", "-o", "json").stdout)
        ready = [
            i
            for i in out["items"]
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in i.get("status", {}).get("conditions", [])
            )
        ]
        return len(ready) == 2

    wait_for(both_ready, timeout=60, what="two Ready ZmachineNodes")
    table = fleet.cluster.kubectl("get", "zmn").stdout
    assert "node-a" in table and "node-b" in table and "qemu" in table


def test_apply_reaches_running_with_ip_and_entrypoint_output(fleet: Fleet) -> None:
    fleet.kubectl("apply", "-f", "-", input=manifest(fleet, "web"))
    st = wait_phase(fleet, "web", "Running")
    assert st["nodeName"] in fleet.agents
    assert st["ip"].startswith("10.233.")
    assert st["bootMode"] == "container"
    st = wait_for(
        lambda: (s := status(fleet, "web")) and condition(s, "Ready")["status"] == "True" and s,
        timeout=120,
        what="Ready once the guest's init handed over to the entrypoint",
    )
    assert condition(st, "Scheduled")["status"] == "True"
    machine: Any = fleet.agents[st["nodeName"]].call("get", uid_of(fleet, "web"))
    wait_for(
        lambda: f"zm-test-entry {GREETING}" in Path(machine.console_log).read_text(),
        timeout=120,
        what="the entrypoint's output on the serial log",
    )


def test_pinned_zmachine_runs_on_the_other_node(fleet: Fleet) -> None:
    first = status(fleet, "web")["nodeName"]
    other = next(n for n in fleet.agents if n != first)
    fleet.kubectl("apply", "-f", "-", input=manifest(fleet, "pinned", nodeName=other))
    st = wait_phase(fleet, "pinned", "Running")
    assert st["nodeName"] == other


def test_zmachine_that_fits_nowhere_stays_pending_with_the_reason(fleet: Fleet) -> None:
    fleet.kubectl("apply", "-f", "-",
        input=manifest(fleet, "huge", computeCapacity={"cpu": 64, "memory": "256Mi"}),
    )  # fmt: skip
    st = wait_phase(fleet, "huge", "Pending", timeout=60)
    scheduled = condition(st, "Scheduled")
    assert scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"
    assert "insufficient cpu" in scheduled["message"]
    described = fleet.kubectl("describe", "zm", "huge")
    assert "Unschedulable" in described
    fleet.kubectl("delete", "zm", "huge", "--wait=true", "--timeout=60s")


def test_pause_and_resume(fleet: Fleet) -> None:
    fleet.kubectl("patch", "zm", "web", "--type=merge", "-p", '{"spec":{"paused":true}}')
    st = wait_phase(fleet, "web", "Paused", timeout=60)
    assert condition(st, "Paused")["status"] == "True"
    fleet.kubectl("patch", "zm", "web", "--type=merge", "-p", '{"spec":{"paused":false}}')
    wait_phase(fleet, "web", "Running", timeout=60)


def test_memory_change_restarts_with_the_new_size(fleet: Fleet) -> None:
    uid = uid_of(fleet, "web")
    before = vm_pids(uid)
    fleet.kubectl("patch", "zm", "web", "--type=merge",
        "-p", '{"spec":{"computeCapacity":{"cpu":1,"memory":"384Mi"}}}',
    )  # fmt: skip

    def resized() -> bool:
        obj = fleet.get("web") or {}
        st = obj.get("status") or {}
        return (
            st.get("observedGeneration") == obj["metadata"]["generation"]
            and st.get("phase") == "Running"
        )

    wait_for(resized, timeout=240, interval=1, what="web running its new generation")
    after = vm_pids(uid)
    assert after and after != before
    cmdline = Path(f"/proc/{after[0]}/cmdline").read_text().replace("\0", " ")
    assert "384" in cmdline, cmdline


def test_stopped_agent_makes_its_zmachines_unknown_and_its_return_running(fleet: Fleet) -> None:
    node = status(fleet, "pinned")["nodeName"]
    uid = uid_of(fleet, "pinned")
    pids = vm_pids(uid)
    agent = fleet.agents[node]
    agent.stop()
    started = time.monotonic()
    wait_phase(fleet, "pinned", "Unknown", timeout=60)  # at once: the agent does not answer
    assert time.monotonic() - started < 40
    wait_for(
        lambda: condition(status(fleet, "pinned"), "NodeReady")["status"] == "False",
        timeout=60, interval=1, what="NodeReady False once the node's Lease expired",
    )  # fmt: skip
    assert vm_pids(uid) == pids  # the VM itself keeps running without its agent
    agent.start()
    wait_phase(fleet, "pinned", "Running", timeout=90)
    assert vm_pids(uid) == pids  # adopted, not duplicated


def secret(fleet: Fleet, token: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds", "namespace": fleet.ns}, "stringData": {"token": token},
    })  # fmt: skip


def test_exit_code_reaches_the_status_and_a_changed_secret_rolls_out(fleet: Fleet) -> None:
    fleet.kubectl("apply", "-f", "-", input=secret(fleet, "first-value"))
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    job = manifest(
        fleet, "job", restartPolicy="Never", env=env,
        entrypoint="/bin/sh -c 'echo token=$TOKEN; exit 3'",
    )  # fmt: skip
    fleet.kubectl("apply", "-f", "-", input=job)
    st = wait_phase(fleet, "job", "Failed")
    assert (st["exitCode"], st["exitReason"]) == (3, "Error")
    generation = (fleet.get("job") or {})["metadata"]["generation"]
    machine: Any = fleet.agents[st["nodeName"]].call("get", uid_of(fleet, "job"))
    console = Path(machine.console_log)
    assert "token=first-value" in console.read_text()

    fleet.kubectl("apply", "-f", "-", input=secret(fleet, "second-value"))
    wait_for(
        lambda: "token=second-value" in console.read_text(),
        timeout=240,
        interval=1,
        what="the Secret's new value in a new VM",
    )
    assert (fleet.get("job") or {})["metadata"]["generation"] == generation
    assert wait_phase(fleet, "job", "Failed")["exitCode"] == 3
    fleet.kubectl("delete", "zm", "job", "--wait=true", "--timeout=120s")


def test_delete_leaves_nothing_on_the_node(fleet: Fleet) -> None:
    for name in ("web", "pinned"):
        st = status(fleet, name)
        uid = uid_of(fleet, name)
        agent = fleet.agents[st["nodeName"]]
        fleet.kubectl("delete", "zm", name, "--wait=true", "--timeout=120s")
        assert fleet.get(name) is None
        assert vm_pids(uid) == []
        mounts = Path("/proc/mounts").read_text()
        assert uid not in mounts
        leftovers = [p for p in agent.state_dir.rglob("*") if uid in str(p)]
        assert leftovers == []
        assert agent.call("list") == []
