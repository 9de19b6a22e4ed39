"""One real container-mode VM (busybox flist, real FUSE, QEMU under TCG) through its
whole life on a real agent process: boot + env, idempotent Deploy, generations, pause,
agent SIGKILL and adoption, VMM crash and restart, Delete leaving nothing behind.

The tests share one VM and run in file order (each builds on the previous state), to
keep guest boots at three: the first boot, the supervisor's restart, the new generation.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.procs import cmdline
from tests.agent.agent_harness import AgentProcess, EventRecorder, loop_backing_files
from tests.agent.conftest import AGENT_ENTRYPOINT, AGENT_GREETING_VAR, agent_process

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(300)]

UID = "0b4c5f0e-agent-vm-test"
REF = pb.ZmachineRef(namespace="default", name="busybox", uid=UID)
GREETING = "hello-from-the-agent-test"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def vm_pids_of(uid: str) -> list[tuple[int, str]]:
    """(pid, argv0) of every process whose command line names ``uid`` (VMM, virtiofsd,
    FUSE mount)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name))
            if any(uid in arg for arg in argv):
                found.append((int(entry.name), argv[0]))
    return found


def vm_processes() -> list[int]:
    return [pid for pid, _ in vm_pids_of(UID)]


def qemu_pids() -> list[int]:
    return [pid for pid, argv0 in vm_pids_of(UID) if "qemu-system" in argv0]


def loops_of(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    return out.stdout.splitlines()


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(path))]


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_netns: str,
    agent_busybox_flist: Path,
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("vm") / "state"
    proc = agent_process(state, agent_pki, agent_netns, agent_guest_dir, agent_busybox_flist.parent)
    with proc.running():
        yield proc


@pytest.fixture(scope="module")
def spec(agent_busybox_flist: Path) -> pb.ZmachineSpec:
    return pb.ZmachineSpec(
        flist=f"file://{agent_busybox_flist}",
        cpu=1,
        memory_bytes=256 << 20,
        entrypoint=AGENT_ENTRYPOINT,
        env={AGENT_GREETING_VAR: GREETING},
        interfaces=[pb.NetworkInterface(network="lan")],
        volumes=[
            pb.Volume(name="data", kind=pb.VOLUME_KIND_DISK, size_bytes=64 << 20),
            pb.Volume(name="shared", kind=pb.VOLUME_KIND_SHARE),
        ],
        mounts=[
            pb.Mount(name="data", mountpoint="/data"),
            pb.Mount(name="shared", mountpoint="/srv"),
        ],
        restart_policy=pb.RESTART_POLICY_ALWAYS,
    )


def machine(agent: AgentProcess) -> pb.Machine:
    m = agent.call("get", UID)
    assert isinstance(m, pb.Machine)
    return m


@pytest.fixture(scope="module")
def events(agent: AgentProcess) -> Iterator[EventRecorder]:
    recorder = EventRecorder(agent, UID)
    recorder.start()
    yield recorder
    recorder.stop()


def deploy_error(agent: AgentProcess, generation: int, spec: pb.ZmachineSpec) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        agent.call("deploy", REF, generation, spec)
    return err.value.code()


def test_container_vm_boots_and_entrypoint_sees_env(
    agent: AgentProcess, spec: pb.ZmachineSpec, events: EventRecorder
) -> None:
    resp = agent.deploy_settled(REF, 1, spec)
    assert isinstance(resp, pb.DeployResponse) and resp.changed
    m = resp.machine
    assert m.state == pb.MACHINE_STATE_RUNNING and m.pid > 0
    assert m.boot_mode == pb.BOOT_MODE_CONTAINER
    assert m.interfaces[0].ip.startswith("10.231.0.")
    console = Path(m.console_log)
    wait_for(
        "the entrypoint's output on the serial log",
        lambda: f"zm-test-entry {GREETING}" in console.read_text(errors="replace"),
        timeout=150,
    )
    # The disk volume (ext4, formatted by the agent) and the share are mounted in the guest.
    wait_for(
        "the guest's /proc/mounts lines",
        lambda: all(
            m in console.read_text(errors="replace") for m in ("/data ext4", "/srv virtiofs")
        ),
        timeout=20,
    )
    shared = agent.state_dir / "vms" / UID / "shares/shared/hello"
    wait_for(
        "the guest's write into the share",
        lambda: shared.exists() and shared.read_text() == "from-guest\n",
        timeout=20,
    )
    upper = agent.state_dir / "vms" / UID / "layer/upper"
    # The image's SSH host key was dropped from the VM's writable layer on first creation.
    assert not (agent.state_dir / "vms" / UID / "rootfs/etc/ssh/ssh_host_ed25519_key").exists()
    assert upper.is_dir()
    wait_for("boot duration", lambda: machine(agent).boot_duration_seconds > 0, timeout=10)


def test_root_is_limited_to_root_size(agent: AgentProcess) -> None:
    """spec.size 0 with 1 vCPU/256 MiB: zos's minimum, 500 MiB. The guest's writes go
    through virtiofsd to the host overlay, so writing through that overlay is what the
    guest would do: past the size it gets ENOSPC."""
    vm_dir = agent.state_dir / "vms" / UID
    image = vm_dir / "rootfs.ext4"
    assert image.stat().st_size == 500 << 20
    assert image.stat().st_blocks * 512 < 64 << 20, "the image must be sparse"
    assert len(loops_of(image)) == 1
    assert {str(vm_dir / "layer"), str(vm_dir / "rootfs")} <= set(mounts_under(vm_dir))
    st = os.statvfs(vm_dir / "rootfs")
    assert 400 << 20 < st.f_blocks * st.f_frsize <= 500 << 20
    big = vm_dir / "rootfs/root/big"
    try:
        with open(big, "wb") as f, pytest.raises(OSError) as err:
            os.posix_fallocate(f.fileno(), 0, 520 << 20)
        assert err.value.errno == errno.ENOSPC
    finally:
        big.unlink(missing_ok=True)
    (vm_dir / "rootfs/root/kept").write_text("written before the grow\n")
    # The VMM runs in the agent's mount namespace (nsenter --net, not ip netns exec): a
    # private copy of the mount table would pin every root image mounted at its start.
    qemu = qemu_pids()[0]
    assert os.readlink(f"/proc/{qemu}/ns/mnt") == os.readlink("/proc/self/ns/mnt")


def test_second_identical_deploy_is_a_noop(agent: AgentProcess, spec: pb.ZmachineSpec) -> None:
    before = machine(agent).pid
    resp = agent.deploy_settled(REF, 1, spec)
    assert isinstance(resp, pb.DeployResponse)
    assert not resp.changed
    assert resp.machine.pid == before
    assert qemu_pids() == [before]
    assert len(agent.call("list")) == 1  # type: ignore[arg-type]


def test_stale_or_conflicting_generation_is_refused(
    agent: AgentProcess, spec: pb.ZmachineSpec
) -> None:
    assert deploy_error(agent, 0, spec) == grpc.StatusCode.FAILED_PRECONDITION
    changed = pb.ZmachineSpec()
    changed.CopyFrom(spec)
    # Not only env (a Secret's new value rolls out at the same generation): refused.
    changed.env[AGENT_GREETING_VAR] = "other"
    changed.memory_bytes += 64 << 20
    assert deploy_error(agent, 1, changed) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(qemu_pids()) == 1


def test_pause_and_resume_by_rpc_and_by_generation(
    agent: AgentProcess, spec: pb.ZmachineSpec, events: EventRecorder
) -> None:
    pid = machine(agent).pid
    m = agent.call("pause", UID)
    assert isinstance(m, pb.Machine) and m.state == pb.MACHINE_STATE_PAUSED
    m = agent.call("resume", UID)
    assert isinstance(m, pb.Machine) and m.state == pb.MACHINE_STATE_RUNNING
    paused = pb.ZmachineSpec()
    paused.CopyFrom(spec)
    paused.paused = True
    resp = agent.deploy_settled(REF, 2, paused)
    assert isinstance(resp, pb.DeployResponse) and resp.changed
    assert resp.machine.state == pb.MACHINE_STATE_PAUSED and resp.machine.generation == 2
    resp = agent.deploy_settled(REF, 3, spec)
    assert isinstance(resp, pb.DeployResponse)
    assert resp.machine.state == pb.MACHINE_STATE_RUNNING
    assert resp.machine.pid == pid, "pausing must not replace the VM"
    wait_for("events", lambda: len(events.types()) >= 6, timeout=10)
    assert events.types() == [
        "EVENT_TYPE_DEPLOYED",
        "EVENT_TYPE_BOOTED",  # the first test waited for the entrypoint's output
        "EVENT_TYPE_PAUSED",
        "EVENT_TYPE_RESUMED",
        "EVENT_TYPE_UPDATED",  # generation 2: paused
        "EVENT_TYPE_UPDATED",  # generation 3: running again
    ]


def test_stats_and_metrics_report_the_vm(agent: AgentProcess, agent_netns: str) -> None:
    ip = machine(agent).interfaces[0].ip
    # Traffic for the net counters: the guest answers pings on the test namespace's bridge.
    ping = subprocess.run(
        ["ip", "netns", "exec", agent_netns, "busybox", "ping", "-c", "3", "-W", "5", ip],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    stats = agent.call("stats", UID)
    assert isinstance(stats, pb.MachineStats)
    assert stats.vcpu_seconds > 0 and stats.vmm_rss_bytes > 0
    assert stats.block_read_bytes > 0 and stats.block_write_bytes > 0  # seed read, /data written
    assert stats.net_rx_bytes >= 3 * 84 and stats.net_tx_bytes >= 3 * 84  # 3 echo/reply pairs
    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10)
    text = body.read().decode()
    assert f'zmachine_vcpu_seconds_total{{name="busybox",namespace="default",uid="{UID}"}}' in text
    assert "zmachine_boot_duration_seconds{" in text


def test_agent_sigkill_then_restart_adopts_the_running_vm(
    agent: AgentProcess, spec: pb.ZmachineSpec
) -> None:
    before = machine(agent)
    pid = before.pid
    agent.kill()
    assert qemu_pids() == [pid], "the VM must outlive the agent"
    agent.start()
    m = machine(agent)
    assert m.pid == pid and m.state == pb.MACHINE_STATE_RUNNING
    assert m.boot_duration_seconds == before.boot_duration_seconds > 0  # nothing lost
    # The restarted agent knows the deployed generation from its state file: no-op.
    resp = agent.deploy_settled(REF, 3, spec)
    assert isinstance(resp, pb.DeployResponse) and not resp.changed
    assert resp.machine.pid == pid
    time.sleep(2)  # a few supervisor rounds: still no second VM, no restart
    assert qemu_pids() == [pid]
    assert machine(agent).restarts == 0


def test_vmm_killed_from_outside_is_restarted_and_counted(agent: AgentProcess) -> None:
    # The agent was restarted above, so this VMM is adopted (not its child): the exit
    # status is unknown and counts as a failure; policy Always restarts it anyway.
    old = machine(agent).pid
    os.kill(old, signal.SIGKILL)

    def restarted() -> pb.Machine | None:
        m = machine(agent)
        return m if m.restarts == 1 and m.pid not in (0, old) else None

    m = wait_for("the supervisor's restart", restarted, timeout=60)
    assert m.state == pb.MACHINE_STATE_RUNNING
    assert qemu_pids() == [m.pid]


def test_restart_rpc_replaces_the_vmm(agent: AgentProcess) -> None:
    old = machine(agent)
    m = agent.call("restart", UID)
    assert isinstance(m, pb.Machine)
    assert m.pid not in (0, old.pid) and m.restarts == old.restarts + 1
    assert qemu_pids() == [m.pid]


def test_node_reboot_while_agent_down_brings_the_vm_back(
    agent: AgentProcess, agent_netns: str
) -> None:
    """What a node reboot leaves: the state dir, but no VM processes, mounts or taps."""
    before = machine(agent)
    agent.kill()
    for pid in vm_processes():
        os.kill(pid, signal.SIGKILL)
    wait_for("the VM's processes to die", lambda: not vm_processes(), timeout=10)
    for mountpoint in sorted(mounts_under(agent.state_dir), reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=True)
    tap = before.interfaces[0].tap
    subprocess.run(["ip", "-n", agent_netns, "link", "del", tap], check=True)
    agent.start()

    def back() -> pb.Machine | None:
        m = machine(agent)
        up = m.state == pb.MACHINE_STATE_RUNNING and m.restarts == before.restarts + 1
        return m if up and m.pid not in (0, before.pid) else None

    m = wait_for("the VM to be restarted", back, timeout=60)
    assert qemu_pids() == [m.pid]
    vm_dir = agent.state_dir / "vms" / UID
    assert {str(vm_dir / d) for d in ("layer", "rootfs")} <= set(mounts_under(vm_dir))
    assert len(mounts_under(agent.state_dir / "flists")) == 1  # the flist, mounted again
    assert len(loops_of(vm_dir / "rootfs.ext4")) == 1
    assert subprocess.run(["ip", "-n", agent_netns, "link", "show", tap]).returncode == 0


def test_new_generation_replaces_the_vm_with_the_new_spec(
    agent: AgentProcess, spec: pb.ZmachineSpec
) -> None:
    old = machine(agent).pid
    changed = pb.ZmachineSpec()
    changed.CopyFrom(spec)
    changed.env[AGENT_GREETING_VAR] = "second-generation"
    changed.size_bytes = 600 << 20  # the root grows from the 500 MiB minimum
    resp = agent.deploy_settled(REF, 4, changed)
    assert isinstance(resp, pb.DeployResponse) and resp.changed
    m = resp.machine
    assert m.generation == 4 and m.pid not in (0, old) and m.restarts == 0
    assert qemu_pids() == [m.pid]
    vm_dir = agent.state_dir / "vms" / UID
    assert (vm_dir / "rootfs.ext4").stat().st_size == 600 << 20
    st = os.statvfs(vm_dir / "rootfs")
    assert 500 << 20 < st.f_blocks * st.f_frsize <= 600 << 20
    assert (vm_dir / "rootfs/root/kept").read_text() == "written before the grow\n"
    wait_for(
        "the new generation's output",
        lambda: "zm-test-entry second-generation" in Path(m.console_log).read_text(),
        timeout=150,
    )


def test_root_size_cannot_shrink(agent: AgentProcess, spec: pb.ZmachineSpec) -> None:
    pid = machine(agent).pid
    smaller = pb.ZmachineSpec()
    smaller.CopyFrom(spec)
    smaller.size_bytes = 500 << 20
    with pytest.raises(grpc.aio.AioRpcError) as err:
        agent.call("deploy", REF, 5, smaller)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "spec.size: root size can only grow: 600Mi -> 500Mi" in (err.value.details() or "")
    m = machine(agent)
    assert m.generation == 4 and m.pid == pid and m.state == pb.MACHINE_STATE_RUNNING


def test_delete_leaves_no_process_mount_tap_or_file(agent: AgentProcess, agent_netns: str) -> None:
    m = machine(agent)
    tap = m.interfaces[0].tap
    image = agent.state_dir / "vms" / UID / "rootfs.ext4"
    assert subprocess.run(["ip", "-n", agent_netns, "link", "show", tap]).returncode == 0
    assert vm_processes() and mounts_under(agent.state_dir / "vms" / UID)
    assert loops_of(image)
    assert agent.call("delete", UID) is True
    assert vm_processes() == [], [cmdline(p) for p in vm_processes()]
    assert mounts_under(agent.state_dir) == []
    assert str(agent.state_dir) not in Path("/proc/mounts").read_text()
    assert loops_of(image) == []
    # Also no device left on the deleted file (losetup -j needs the file to exist).
    assert not [f for f in loop_backing_files() if f.startswith(str(agent.state_dir))]
    link = subprocess.run(["ip", "-n", agent_netns, "link", "show", tap], capture_output=True)
    assert link.returncode != 0, "tap still exists"
    assert not (agent.state_dir / "vms" / UID).exists()
    assert not (agent.state_dir / "machines" / f"{UID}.json").exists()
    assert UID not in (agent.state_dir / "ipam.json").read_text()
    assert agent.call("list") == []
