"""Restart policies with real guests that power themselves off (GuestExit PowerOff).

OnFailure: a guest power-off is success, the machine ends SUCCEEDED and is not restarted.
Always: every exit is restarted with backoff, and past --crash-loop-limit the machine
ends FAILED (CrashLoop) with the tail of its serial log. Both VMs boot at the same time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from controller.agent.hypervisor.qmp import QMP
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.procs import cmdline
from tests.agent.agent_harness import AgentProcess
from tests.agent.test_agent_vm import vm_pids_of, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(300)]

BYE = "/bin/sh -c 'echo zm-test-bye; poweroff -f'"


@pytest.fixture(scope="module")
def agent(agent_strict: AgentProcess) -> AgentProcess:
    return agent_strict


def in_state(agent: AgentProcess, uid: str, state: int) -> pb.Machine | None:
    m = agent.call("get", uid)
    assert isinstance(m, pb.Machine)
    return m if m.state == state else None


def test_guest_poweroff_is_success_for_onfailure_and_a_crash_loop_for_always(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    machines = {}
    onfailure, always = f"p-onfailure-{os.getpid()}", f"p-always-{os.getpid()}"
    for uid, policy in ((onfailure, pb.RESTART_POLICY_ON_FAILURE),
                        (always, pb.RESTART_POLICY_ALWAYS)):  # fmt: skip
        spec = pb.ZmachineSpec(
            flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20,
            entrypoint=BYE, restart_policy=policy,
        )  # fmt: skip
        ref = pb.ZmachineRef(namespace="default", name=uid, uid=uid)
        agent.call("deploy", ref, 1, spec)
        machines[uid] = ref

    done = wait_for(
        "OnFailure machine to succeed",
        lambda: in_state(agent, onfailure, pb.MACHINE_STATE_SUCCEEDED),
        timeout=180,
    )
    assert done.reason == "PoweredOff" and done.restarts == 0 and done.pid == 0
    assert "zm-test-bye" in Path(done.console_log).read_text()

    failed = wait_for(
        "Always machine to end in a crash loop",
        lambda: in_state(agent, always, pb.MACHINE_STATE_FAILED),
        timeout=240,
    )
    assert failed.reason == "CrashLoop" and failed.restarts == 1
    assert "zm-test-bye" in failed.log_tail, failed.log_tail
    assert "2 times in a row" in failed.message

    for uid in machines:
        assert not [p for p in vm_pids_of(uid) if "qemu" in p[1]]
        assert agent.call("delete", uid) is True
        left = vm_pids_of(uid)
        assert left == [], [cmdline(pid) for pid, _ in left]
    assert not (agent.state_dir / "vms").exists() or not list((agent.state_dir / "vms").iterdir())


def test_guest_poweroff_while_the_agent_is_down_is_still_a_success(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    """The VMM is not the new agent's child and no agent read its events: QEMU runs
    with -no-shutdown, so it waits, alive with the guest shut down, and the new agent
    sees a power-off (OnFailure ends SUCCEEDED, no restart), then ends it."""
    uid = f"p-offline-{os.getpid()}"
    spec = pb.ZmachineSpec(
        flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint="/bin/sh -c 'while [ ! -e /srv/stop ]; do sleep 1; done; poweroff -f'",
        volumes=[pb.Volume(name="ctl", kind=pb.VOLUME_KIND_SHARE)],
        mounts=[pb.Mount(name="ctl", mountpoint="/srv")],
        restart_policy=pb.RESTART_POLICY_ON_FAILURE,
    )  # fmt: skip
    resp = agent.deploy_settled(pb.ZmachineRef(namespace="default", name="off", uid=uid), 1, spec)
    assert isinstance(resp, pb.DeployResponse)
    console = Path(resp.machine.console_log)
    wait_for("the guest to boot", lambda: "switching root" in console.read_text(), timeout=150)
    agent.kill()
    (agent.state_dir / "vms" / uid / "shares/ctl/stop").touch()
    qmp = QMP(agent.state_dir / "vms" / uid / "run" / "vmm.sock")
    wait_for(
        "the guest to power off",
        lambda: asyncio.run(qmp.execute("query-status"))["status"] == "shutdown",
        timeout=60,
    )
    assert [p for p in vm_pids_of(uid) if "qemu" in p[1]], "QEMU ended without an agent"
    agent.start()
    m = wait_for(
        "the machine to end", lambda: in_state(agent, uid, pb.MACHINE_STATE_SUCCEEDED), timeout=30
    )
    assert m.reason == "PoweredOff" and m.restarts == 0
    assert not [p for p in vm_pids_of(uid) if "qemu" in p[1]]
