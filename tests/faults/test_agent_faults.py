"""Faults around the agent's provisioning and supervision, on a real agent process with
real FUSE, overlay, root image, taps and virtiofsd, and the stand-in VMM
(tests/bench/standin_vmm.c: no guest boot is needed here). Faults come from the agent's
test-only ``ZM_AGENT_FAULTS`` (controller/agent/faults.py) or from signals sent to the
agent or its VMM. Every test ends with the host leak scan, under the one-VMM-per-uid
sampler."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.layout import VMPaths
from tests.agent.agent_harness import AgentProcess, EventRecorder
from tests.agent.conftest import standin_agent_process
from tests.agent.test_agent_vm import wait_for
from tests.agent.test_standin_vmm import standin_spec
from tests.faults.invariants import OneVmmPerUid, leaks, vmm_pids_by_uid

pytestmark = [pytest.mark.faults, pytest.mark.fuse, pytest.mark.timeout(180)]

FAULTS = "ZM_AGENT_FAULTS"


def ref(uid: str) -> pb.ZmachineRef:
    return pb.ZmachineRef(namespace="faults", name=uid[:20], uid=uid)


def get(agent: AgentProcess, uid: str) -> pb.Machine | None:
    try:
        m = agent.call("get", uid)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    assert isinstance(m, pb.Machine)
    return m


def wait_state(
    agent: AgentProcess, uid: str, state: pb.MachineState.ValueType, timeout: float = 60
) -> pb.Machine:
    def probe() -> pb.Machine | None:
        m = get(agent, uid)
        return m if m is not None and m.state == state else None

    return wait_for(f"{uid} in {pb.MachineState.Name(state)}", probe, timeout)


def deploy(agent: AgentProcess, uid: str, spec: pb.ZmachineSpec, generation: int = 1) -> None:
    agent.call("deploy", ref(uid), generation, spec)


def the_vmm(agent: AgentProcess, uid: str) -> int:
    """The one VMM the host runs for ``uid`` (read from /proc, not from the agent)."""
    pids = vmm_pids_by_uid([agent.state_dir]).get(uid, [])
    assert len(pids) == 1, pids
    return pids[0]


@contextmanager
def cleaned_up_on_failure(agent: AgentProcess) -> Iterator[None]:
    """A failed test leaves the agent stopped and its machines deleted (VMs outlive
    agents by design, so nothing else would remove them)."""
    try:
        yield
    except BaseException:
        agent.env = {}
        try:
            agent.delete_all()
        finally:
            agent.stop()
        raise


def new_agent(
    state: Path, pki: Path, netns: str, guest: Path, flist: Path, *more: str
) -> AgentProcess:
    return standin_agent_process(state, pki, netns, guest, flist.parent, *more)


# --- the agent dies at each provisioning step ------------------------------------------

# Container mode passes these points in this order (image mode has after-image instead of
# after-mount and after-volumes). After a restart without the fault, every one of them
# is finished, none undone: the record is durable before the first step, each step is
# idempotent and the VMM started before the crash is adopted, not started again.
CONTAINER_POINTS = (
    "after-fetch",
    "after-mount",
    "after-volumes",
    "after-network",
    "after-seed",
    "after-virtiofsd",
    "after-vmm",
)


@pytest.mark.parametrize("point", CONTAINER_POINTS)
def test_agent_killed_at_a_step_finishes_the_machine_after_restart(
    point: str,
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> None:
    state = tmp_path_factory.mktemp("kill") / "state"  # short: socket paths have a limit
    agent = new_agent(state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist)
    uid = f"kill-{point.removeprefix('after-')}"
    with OneVmmPerUid([state]).watching(), cleaned_up_on_failure(agent):
        agent.env = {FAULTS: f"{point}=kill"}
        agent.start()
        try:
            deploy(agent, uid, standin_spec(agent_busybox_flist))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE  # it died before answering
        assert agent.proc is not None
        assert agent.proc.wait(30) == -signal.SIGKILL, "the fault point was not reached"
        agent.env = {}
        with agent.running():
            m = wait_state(agent, uid, pb.MACHINE_STATE_RUNNING)
            assert m.generation == 1 and m.pid == the_vmm(agent, uid)
            assert agent.call("delete", uid) is True
    assert leaks([state], agent_netns) == []


def test_agent_sigterm_while_provisioning_keeps_the_machine(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> None:
    """The agent's own shutdown tears nothing down; the next agent finishes the job."""
    state = tmp_path_factory.mktemp("term") / "state"
    agent = new_agent(state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist)
    uid = "sigterm"
    with OneVmmPerUid([state]).watching(), cleaned_up_on_failure(agent):
        agent.env = {FAULTS: "after-virtiofsd=delay:60"}
        agent.start()
        deploy(agent, uid, standin_spec(agent_busybox_flist))
        wait_for("the delay", lambda: (m := get(agent, uid)) and "VMM" in m.message, 30)
        agent.stop()  # SIGTERM
        assert (state / "vms" / uid / "rootfs.ext4").exists()
        agent.env = {}
        with agent.running():
            m = wait_state(agent, uid, pb.MACHINE_STATE_RUNNING)
            assert m.pid == the_vmm(agent, uid)
            assert agent.call("delete", uid) is True
    assert leaks([state], agent_netns) == []


def test_a_paused_spec_is_not_reported_running_while_it_is_paused(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> None:
    """The VMM runs for a moment before it is paused; a Get in that moment must not say
    Running (a controller would write it to the status)."""
    state = tmp_path_factory.mktemp("pause") / "state"
    agent = new_agent(state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist)
    uid = "paused-start"
    spec = standin_spec(agent_busybox_flist)
    spec.paused = True
    with OneVmmPerUid([state]).watching(), cleaned_up_on_failure(agent):
        agent.env = {FAULTS: "pausing=delay:3"}
        with agent.running():
            deploy(agent, uid, spec)
            seen: list[tuple[str, str]] = []
            deadline = time.monotonic() + 60
            while (m := get(agent, uid)) is not None and time.monotonic() < deadline:
                seen.append((pb.MachineState.Name(m.state), m.message))
                if m.state != pb.MACHINE_STATE_PROVISIONING:
                    break
                time.sleep(0.05)
            assert ("MACHINE_STATE_PROVISIONING", "pausing the VM") in seen, seen
            assert seen[-1][0] == "MACHINE_STATE_PAUSED", seen
            assert agent.call("delete", uid) is True
    assert leaks([state], agent_netns) == []


# --- provisioning longer than any RPC ---------------------------------------------------

DELAY = 20  # seconds the agent waits after starting virtiofsd, before the VMM


@pytest.fixture(scope="module")
def slow_agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("slow") / "state"
    agent = new_agent(state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist)
    agent.env = {FAULTS: f"after-virtiofsd=delay:{DELAY}"}
    with agent.running():
        yield agent
    assert leaks([state], agent_netns) == []


def test_deploy_slower_than_the_rpc_deadline_finishes_once(
    slow_agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    uid = "slow-deploy"
    spec = standin_spec(agent_busybox_flist)
    events = EventRecorder(slow_agent, uid)
    events.start()

    async def impatient_deploys() -> list[pb.DeployResponse]:
        async with AgentClient(slow_agent.address, slow_agent.tls, timeout=5) as client:
            first = await client.deploy(ref(uid), 1, spec)
            await asyncio.sleep(6)  # the first call's deadline is long gone
            return [first, await client.deploy(ref(uid), 1, spec)]

    try:
        with OneVmmPerUid([slow_agent.state_dir]).watching():
            first, again = asyncio.run(impatient_deploys())
            assert first.machine.state == pb.MACHINE_STATE_PROVISIONING and first.changed
            assert again.machine.state == pb.MACHINE_STATE_PROVISIONING and not again.changed
            assert again.machine.message == "starting the VMM"  # progress, seen through Get
            m = wait_state(slow_agent, uid, pb.MACHINE_STATE_RUNNING, timeout=DELAY + 40)
            assert m.pid == the_vmm(slow_agent, uid)
            time.sleep(1)  # let a second DEPLOYED show, were there one
            assert events.types().count("EVENT_TYPE_DEPLOYED") == 1, events.types()
            assert slow_agent.call("delete", uid) is True
    finally:
        events.stop()
    assert leaks([slow_agent.state_dir], agent_netns) == []


def test_delete_during_the_first_deploy_leaves_nothing(
    slow_agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    uid = "deleted-early"
    with OneVmmPerUid([slow_agent.state_dir]).watching():
        deploy(slow_agent, uid, standin_spec(agent_busybox_flist))
        wait_for("the delay", lambda: (m := get(slow_agent, uid)) and "VMM" in m.message, 30)
        started = time.monotonic()
        assert slow_agent.call("delete", uid) is True
        assert time.monotonic() - started < DELAY / 2, "Delete waited for the provisioning"
        assert get(slow_agent, uid) is None
        time.sleep(1)
        assert vmm_pids_by_uid([slow_agent.state_dir]) == {}
    assert leaks([slow_agent.state_dir], agent_netns) == []


def test_newer_generation_while_provisioning_starts_over_with_it(
    slow_agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    """Defined behaviour: the running provisioning is stopped at its next step (here at
    once: it waits at the fault point), undone, and the new generation provisioned."""
    uid = "newer-gen"
    first = standin_spec(agent_busybox_flist)
    newer = standin_spec(agent_busybox_flist)
    newer.memory_bytes = 384 << 20
    with OneVmmPerUid([slow_agent.state_dir]).watching():
        deploy(slow_agent, uid, first)
        wait_for("the delay", lambda: (m := get(slow_agent, uid)) and "VMM" in m.message, 30)
        deploy(slow_agent, uid, newer, generation=2)
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            deploy(slow_agent, uid, first)  # generation 1 is older than the one underway
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        m = wait_state(slow_agent, uid, pb.MACHINE_STATE_RUNNING, timeout=DELAY + 40)
        assert m.generation == 2
        vmm = the_vmm(slow_agent, uid)
        cmd = Path(f"/proc/{vmm}/cmdline").read_bytes().decode()
        assert "size=384M" in cmd
        assert slow_agent.call("delete", uid) is True
    assert leaks([slow_agent.state_dir], agent_netns) == []


# --- the VMM killed again and again ------------------------------------------------------


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> Iterator[AgentProcess]:
    """No faults; backoff 1 s, 2 s; the third exit in a row is a crash loop."""
    state = tmp_path_factory.mktemp("sup") / "state"
    agent = new_agent(
        state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist,
        "--crash-loop-limit", "2",
    )  # fmt: skip
    with agent.running():
        yield agent
    assert leaks([state], agent_netns) == []


def kill_each_vmm(agent: AgentProcess, uid: str, times: int) -> list[float]:
    """SIGKILL the uid's VMM ``times`` times, each as soon as it is back up (the agent
    reports it Running); the seconds from each kill to the next VMM being up."""
    gaps: list[float] = []
    killed_at = 0.0
    pid = 0

    def new_vmm() -> int | None:
        m = get(agent, uid)
        up = m is not None and m.state == pb.MACHINE_STATE_RUNNING and m.pid != pid
        return the_vmm(agent, uid) if up and m is not None and m.pid else None

    for _ in range(times):
        pid = wait_for("the VMM back up", new_vmm, timeout=30)
        if killed_at:
            gaps.append(time.monotonic() - killed_at)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
    return gaps


@pytest.mark.parametrize(
    "policy", [pb.RESTART_POLICY_ALWAYS, pb.RESTART_POLICY_ON_FAILURE, pb.RESTART_POLICY_NEVER]
)
def test_vmm_killed_repeatedly_backs_off_then_fails_with_the_log_tail(
    agent: AgentProcess,
    agent_busybox_flist: Path,
    agent_netns: str,
    policy: pb.RestartPolicy.ValueType,
) -> None:
    uid = f"crash-{pb.RestartPolicy.Name(policy).removeprefix('RESTART_POLICY_').lower()}"
    uid = uid.replace("_", "-")
    events = EventRecorder(agent, uid)
    events.start()
    try:
        with OneVmmPerUid([agent.state_dir]).watching():
            deploy(agent, uid, standin_spec(agent_busybox_flist, policy))
            wait_state(agent, uid, pb.MACHINE_STATE_RUNNING)
            if policy == pb.RESTART_POLICY_NEVER:
                kill_each_vmm(agent, uid, 1)
                m = wait_state(agent, uid, pb.MACHINE_STATE_FAILED, timeout=20)
                assert m.reason == "VMMExited" and m.restarts == 0
                assert "killed by SIGKILL" in m.message
            else:
                # Both restart a SIGKILLed VMM: it is no clean power-off.
                gaps = kill_each_vmm(agent, uid, 3)
                assert gaps[0] >= 1 and gaps[1] >= 2, gaps  # backoff 1 s, then 2 s
                m = wait_state(agent, uid, pb.MACHINE_STATE_FAILED, timeout=20)
                assert m.reason == "CrashLoop" and m.restarts == 2
                assert "3 times in a row" in m.message and "SIGKILL" in m.message, m.message
            assert "[console]" in m.log_tail and "stand-in for cloud-hypervisor" in m.log_tail
            assert vmm_pids_by_uid([agent.state_dir]).get(uid) is None
            time.sleep(1)
            assert events.types()[-1] == "EVENT_TYPE_FAILED", events.types()
            assert agent.call("delete", uid) is True
    finally:
        events.stop()
    assert leaks([agent.state_dir], agent_netns) == []


def test_the_agent_acts_on_a_vm_at_once_not_at_its_next_round(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    agent_standin_guest_dir: Path,
    agent_busybox_flist: Path,
) -> None:
    """With the supervisor's rounds 300 s apart: a boot that was over when the VMM came
    up (the stand-in's) is reported with the start, not by a Booted event later, and a
    killed VMM is acted on within seconds, woken by its exit (docs/agent.md "Supervision")."""
    state = tmp_path_factory.mktemp("wake") / "state"
    agent = new_agent(
        state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist,
        "--monitor-interval", "300",
    )  # fmt: skip
    uid = "wake-never"
    with agent.running():
        events = EventRecorder(agent, uid)
        events.start()
        try:
            deploy(agent, uid, standin_spec(agent_busybox_flist, pb.RESTART_POLICY_NEVER))
            m = wait_state(agent, uid, pb.MACHINE_STATE_RUNNING)
            assert m.boot_duration_seconds > 0, "the finished boot was not reported with it"
            os.kill(the_vmm(agent, uid), signal.SIGKILL)
            killed = time.monotonic()
            m = wait_state(agent, uid, pb.MACHINE_STATE_FAILED, timeout=60)
            assert time.monotonic() - killed < 20, "noticed by a round, not by the exit"
            assert m.reason == "VMMExited" and "SIGKILL" in m.message, m.message
            assert "EVENT_TYPE_BOOTED" not in events.types(), events.types()
            assert agent.call("delete", uid) is True
        finally:
            events.stop()
    assert leaks([state], agent_netns) == []


def test_failed_first_provisioning_is_undone_kept_as_failed_and_retried(
    agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    """The flist is missing: the host is left clean but the record stays FAILED with the
    reason; once the flist is there, the next Deploy of the same generation retries."""
    uid = "retried"
    flist = agent_busybox_flist.parent / "arrives-later.fl"
    flist.unlink(missing_ok=True)
    spec = standin_spec(flist)
    with OneVmmPerUid([agent.state_dir]).watching():
        deploy(agent, uid, spec)
        m = wait_state(agent, uid, pb.MACHINE_STATE_FAILED, timeout=30)
        assert m.reason == "ProvisionFailed" and "arrives-later.fl" in m.message, m.message
        left = leaks([agent.state_dir], agent_netns)
        assert left == [f"record {agent.state_dir.resolve()}/machines/{uid}.json"], left
        shutil.copy(agent_busybox_flist, flist)
        deploy(agent, uid, spec)
        wait_state(agent, uid, pb.MACHINE_STATE_RUNNING)
        assert agent.call("delete", uid) is True
    flist.unlink()
    assert leaks([agent.state_dir], agent_netns) == []


def test_a_share_failing_to_start_leaves_no_virtiofsd(
    agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    """virtiofsd for the root starts, the one for the share does not (its pid file is
    locked, as by a stale daemon): the failed provisioning must stop the root's daemon too."""
    uid = "share-fails"
    spec = standin_spec(agent_busybox_flist)
    assert spec.volumes[1].kind == pb.VOLUME_KIND_SHARE  # the VM's first share
    sock = VMPaths.for_uid(agent.state_dir.resolve(), uid).share_socket(0)
    sock.parent.mkdir(parents=True)
    holder = sock.with_name(sock.name + ".pid").open("w")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with holder, OneVmmPerUid([agent.state_dir]).watching():
        deploy(agent, uid, spec)
        m = wait_state(agent, uid, pb.MACHINE_STATE_FAILED, timeout=30)
        assert m.reason == "ProvisionFailed" and "virtiofsd" in m.message, m.message
        left = leaks([agent.state_dir], agent_netns)
        assert left == [f"record {agent.state_dir.resolve()}/machines/{uid}.json"], left
        assert agent.call("delete", uid) is True
    assert leaks([agent.state_dir], agent_netns) == []
