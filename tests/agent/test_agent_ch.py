"""The agent with the real cloud-hypervisor (opt-in: skipped when it is not on PATH).

Guests hang under nested KVM here, but the VMM runs: the agent's own parts around it are
what is checked. A reboot (cloud-hypervisor's VMM-side ``vm.reboot``: it takes the same
path as a guest reset, rebuilding the devices) drops virtio-fs; the agent, driven by
the vm/rebooting event, starts virtiofsd again, so CH reconnects at once instead of
exiting after 60 s. A SIGTERM from outside is not a power-off (CH exits 0 on it): the
supervisor classifies it HostStop and restarts the VM per policy Always.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.hypervisor.ch_api import CloudHypervisorAPI
from controller.agent.hypervisor.cloud_hypervisor import event_names, read_events
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import vm_pids_of, wait_for

pytestmark = [
    pytest.mark.skipif(
        shutil.which("cloud-hypervisor") is None,
        reason="cloud-hypervisor is not on PATH (build it from source: docs/guest-boot.md)",
    ),
    pytest.mark.fuse,
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_busybox_flist: Path,
    agent_netns: str,
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("agent-ch") / "state"
    proc = agent_process(
        state, agent_pki, agent_netns, agent_guest_dir, agent_busybox_flist.parent,
        "--hypervisor", "cloud-hypervisor", "--accel", "kvm",
    )  # fmt: skip
    with proc.running():
        yield proc


def virtiofsd_pids(uid: str) -> list[int]:
    return sorted(pid for pid, argv0 in vm_pids_of(uid) if "virtiofsd" in argv0)


def vmm_pid(uid: str) -> int:
    pids = [pid for pid, argv0 in vm_pids_of(uid) if argv0.endswith("cloud-hypervisor")]
    assert len(pids) == 1, vm_pids_of(uid)
    return pids[0]


def restarted_vm(agent: AgentProcess, uid: str, old_pid: int) -> pb.Machine | None:
    m = agent.call("get", uid)
    assert isinstance(m, pb.Machine)
    return m if m.restarts == 1 and m.pid not in (0, old_pid) else None


def test_reboot_restarts_virtiofsd_and_sigterm_is_not_a_power_off(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    uid = f"ch-reboot-{os.getpid()}"
    spec = pb.ZmachineSpec(
        flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint="/bin/sh -c 'while :; do sleep 3600; done'",
        restart_policy=pb.RESTART_POLICY_ALWAYS,
    )  # fmt: skip
    resp = agent.deploy_settled(pb.ZmachineRef(namespace="default", name="chr", uid=uid), 1, spec)
    assert isinstance(resp, pb.DeployResponse)
    assert resp.machine.hypervisor == "cloud-hypervisor"
    vm_dir = agent.state_dir / "vms" / uid
    before = virtiofsd_pids(uid)
    assert before, vm_pids_of(uid)

    api = CloudHypervisorAPI(vm_dir / "run" / "vmm.sock", timeout=70)
    started = time.monotonic()
    asyncio.run(api.request("PUT", "vm.reboot"))  # answers once CH has rebooted
    took = time.monotonic() - started
    names = event_names(read_events(vm_dir / "vmm-events.json"))
    assert names.count("vm/rebooted") == 1, names
    assert took < 20, f"the reboot took {took:.0f}s (virtiofsd not restarted?)"
    after = wait_for("a new virtiofsd", lambda: virtiofsd_pids(uid) or None, timeout=10)
    assert not set(after) & set(before), (before, after)
    m = agent.call("get", uid)
    assert isinstance(m, pb.Machine)
    assert m.state == pb.MACHINE_STATE_RUNNING and m.restarts == 0

    first = vmm_pid(uid)
    os.kill(first, signal.SIGTERM)  # someone else's SIGTERM: CH exits 0
    restarted = wait_for("the VM to be restarted", lambda: restarted_vm(agent, uid, first), 60)
    assert restarted.state == pb.MACHINE_STATE_RUNNING
    ended = [line for line in agent.log_text().splitlines() if '"vm ended"' in line]
    assert len(ended) == 1 and '"exit": "HostStop"' in ended[0], ended
    assert agent.call("delete", uid) is True
    assert vm_pids_of(uid) == []
