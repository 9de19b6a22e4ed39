"""The container entrypoint's exit code and restartPolicy, with real guests (QEMU/TCG).

Our init stays PID 1, reports the entrypoint's exit code on the serial console with the
boot's nonce and powers off; the agent applies restartPolicy as Kubernetes does for
containers. One agent, six machines booting at once (eight boots):

* Never, a forged marker (wrong nonce, code 0) then ``exit 3``: FAILED, code 3, Error;
* OnFailure, ``exit 0``: SUCCEEDED, code 0, Completed, not restarted;
* OnFailure, ``exit 3``: restarted, then CrashLoop (limit 1) with code 3;
* Always, ``exit 0``: restarted although it succeeded, then CrashLoop with code 0;
* Never, the entrypoint killed by SIGSEGV: FAILED, code 139, and no kernel panic;
* Never, a missing entrypoint: FAILED, code 127, NotFound.
"""

from __future__ import annotations

import os
import subprocess
from functools import partial
from pathlib import Path

import grpc
import pytest

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from tests.agent.agent_harness import AgentProcess
from tests.agent.test_agent_policy import in_state
from tests.agent.test_agent_vm import vm_pids_of, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(420)]

FORGED = "zm-init: exit nonce=" + "0" * 32 + " code=0 reason=Completed"
CASES = {
    # name: (restart policy, entrypoint, final state, reason, exit code, exit reason, restarts)
    "never-3": (
        pb.RESTART_POLICY_NEVER,
        f"/bin/sh -c 'echo \"{FORGED}\"; echo bye; exit 3'",
        pb.MACHINE_STATE_FAILED, "Error", 3, "Error", 0,
    ),
    "onfailure-0": (
        pb.RESTART_POLICY_ON_FAILURE, "/bin/sh -c 'echo bye; exit 0'",
        pb.MACHINE_STATE_SUCCEEDED, "Completed", 0, "Completed", 0,
    ),
    "onfailure-3": (
        pb.RESTART_POLICY_ON_FAILURE, "/bin/sh -c 'echo bye; exit 3'",
        pb.MACHINE_STATE_FAILED, "CrashLoop", 3, "Error", 1,
    ),
    "always-0": (
        pb.RESTART_POLICY_ALWAYS, "/bin/sh -c 'echo bye; exit 0'",
        pb.MACHINE_STATE_FAILED, "CrashLoop", 0, "Completed", 1,
    ),
    # A crash used to kill PID 1 and so panic the kernel, which rebooted in the VMM: the
    # machine stayed Running. Now the init reports the signal (128 + 11).
    "never-segv": (
        pb.RESTART_POLICY_NEVER, "/bin/sh -c 'echo bye; kill -SEGV $$'",
        pb.MACHINE_STATE_FAILED, "Error", 139, "Error", 0,
    ),
    "never-missing": (
        pb.RESTART_POLICY_NEVER, "/usr/bin/missing --flag",
        pb.MACHINE_STATE_FAILED, "NotFound", 127, "NotFound", 0,
    ),
}  # fmt: skip


def ended(agent: AgentProcess, uid: str, generation: int) -> pb.Machine | None:
    """The machine once its run of ``generation`` ended SUCCEEDED."""
    m = in_state(agent, uid, pb.MACHINE_STATE_SUCCEEDED)
    return m if m is not None and m.generation == generation else None


@pytest.fixture(scope="module")
def agent(agent_strict: AgentProcess) -> AgentProcess:
    return agent_strict


def test_entrypoint_exit_codes_under_each_restart_policy(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    uids = {name: f"x-{name}-{os.getpid()}" for name in CASES}
    for name, (policy, entry, *_) in CASES.items():
        spec = pb.ZmachineSpec(
            flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20,
            entrypoint=entry, restart_policy=policy,
        )  # fmt: skip
        agent.call(
            "deploy", pb.ZmachineRef(namespace="default", name=name, uid=uids[name]), 1, spec
        )

    for name, (_, _, state, reason, code, exit_reason, restarts) in CASES.items():
        m = wait_for(f"{name} to end", partial(in_state, agent, uids[name], state), timeout=360)
        assert m.HasField("exit_code"), (name, m)
        got = (m.reason, m.exit_code, m.exit_reason, m.restarts)
        assert got == (reason, code, exit_reason, restarts), (name, m)
        assert f"code {code}" in m.message, (name, m.message)
        console = Path(m.console_log).read_text()
        assert "Kernel panic" not in console, (name, console[-2000:])
        if name != "never-missing":
            assert "bye" in console

    for uid in uids.values():
        assert agent.call("delete", uid) is True
        assert vm_pids_of(uid) == []


def test_a_share_volume_is_limited_to_its_size(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    """A 32 MiB share: the guest's 48 MiB write ends in ENOSPC, the node's disk is safe.
    64 MiB in a new generation grows it offline (the write fits); 16 MiB is refused.
    Delete leaves no loop device."""
    uid = f"x-share-{os.getpid()}"
    entry = (
        "/bin/sh -c '/bin/busybox dd if=/dev/zero of=/srv/fill bs=1M count=48 2>&1; "
        "echo dd-rc=$?; exit 0'"
    )
    spec = pb.ZmachineSpec(
        flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20, entrypoint=entry,
        volumes=[pb.Volume(name="data", kind=pb.VOLUME_KIND_SHARE, size_bytes=32 << 20)],
        mounts=[pb.Mount(name="data", mountpoint="/srv")],
        restart_policy=pb.RESTART_POLICY_NEVER,
    )  # fmt: skip
    ref = pb.ZmachineRef(namespace="default", name="share", uid=uid)
    agent.call("deploy", ref, 1, spec)
    m = wait_for("the share test to end", partial(ended, agent, uid, 1), timeout=240)
    console = Path(m.console_log).read_text()
    assert "No space left on device" in console and "dd-rc=1" in console, console[-2000:]
    share = agent.state_dir / "vms" / uid / "shares"
    image = share / "data.ext4"
    assert image.stat().st_size == 32 << 20
    assert (share / "data/fill").stat().st_size < 32 << 20

    spec.volumes[0].size_bytes = 64 << 20
    agent.call("deploy", ref, 2, spec)
    m = wait_for("the grown share's run to end", partial(ended, agent, uid, 2), timeout=240)
    assert Path(m.console_log).read_text().count("dd-rc=0") == 1
    assert image.stat().st_size == 64 << 20
    assert (share / "data/fill").stat().st_size == 48 << 20
    spec.volumes[0].size_bytes = 16 << 20
    with pytest.raises(grpc.aio.AioRpcError) as err:
        agent.call("deploy", ref, 3, spec)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "spec.volumes[0].size ('data'): a share can only grow" in (err.value.details() or "")
    assert agent.call("delete", uid) is True
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(agent.state_dir) not in loops, loops


def test_a_changed_env_value_rolls_out_at_the_same_generation(
    agent: AgentProcess, agent_busybox_flist: Path
) -> None:
    """What a changed Secret looks like to the agent: the same generation with another
    resolved env value. It makes a new VM with it; the value is never stored in plain."""
    uid = f"x-env-{os.getpid()}"
    ref = pb.ZmachineRef(namespace="default", name="env", uid=uid)

    def spec(token: str) -> pb.ZmachineSpec:
        return pb.ZmachineSpec(
            flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20,
            entrypoint="/bin/sh -c 'echo token=$TOKEN; sleep 600'", env={"TOKEN": token},
        )  # fmt: skip

    first = agent.deploy_settled(ref, 7, spec("old-value-1"))
    assert isinstance(first, pb.DeployResponse) and first.changed
    console = Path(first.machine.console_log)
    wait_for("the first value", lambda: "token=old-value-1" in console.read_text(), timeout=180)
    again = agent.call("deploy", ref, 7, spec("old-value-1"))
    assert isinstance(again, pb.DeployResponse) and not again.changed
    rolled = agent.deploy_settled(ref, 7, spec("new-value-2"))
    assert isinstance(rolled, pb.DeployResponse) and rolled.changed
    assert rolled.machine.env_hash != first.machine.env_hash
    wait_for("the new value", lambda: "token=new-value-2" in console.read_text(), timeout=180)
    record = (agent.state_dir / "machines" / f"{uid}.json").read_text()
    assert "old-value-1" not in record and "new-value-2" not in record
    assert agent.call("delete", uid) is True
