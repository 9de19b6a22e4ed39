"""`make run` / `make down` (hack/devenv.py) when its components die.

A copy of the dev environment of the test's own (ZMACHINE_DEV_DIR, ZMACHINE_DEV_NETNS), with
devenv's own pieces: its agent, started as `make run` starts it, against the session's API
server, with a real VM (QEMU under TCG, FUSE flist): that is what must not outlive `make down`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import ClientTLS
from controller.agent.runtime.procs import ProcessRef
from hack import devenv
from hack.controlplane import ControlPlane
from tests.agent.conftest import agent_busybox_flist, agent_guest_dir  # noqa: F401 (fixtures)
from tests.conftest import REPO
from tests.faults.invariants import OneVmmPerUid, leaks, vmm_pids_by_uid

pytestmark = pytest.mark.faults

SLEEPER = "import time; time.sleep(120)"


def test_a_dead_or_reused_pid_is_not_taken_for_a_running_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devenv, "PIDS", tmp_path / "pids")
    # The agent's marker is in its command line, as in `python -m controller.agent.main`.
    agent = subprocess.Popen([sys.executable, "-c", SLEEPER, "controller.agent.main"])
    stranger = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        devenv.record("agent", agent.pid)
        assert devenv.running().keys() == {"agent"}

        # Killed but not reaped yet: the pid still answers kill(pid, 0).
        agent.kill()
        time.sleep(0.5)
        assert "agent" not in devenv.running()
        agent.wait()

        # The pid now belongs to another program (as after a reboot or pid wrap-around).
        (tmp_path / "pids" / "agent.pid").write_text(
            json.dumps({"pid": stranger.pid, "start_time": 1, "marker": "controller.agent.main"})
        )
        assert "agent" not in devenv.running()
        devenv.record("agent", stranger.pid)  # right start time, wrong command line
        assert "agent" not in devenv.running()
    finally:
        for proc in (agent, stranger):
            proc.kill()
            proc.wait()


def _deploy(address: str, pki: Path, flist: Path) -> None:
    spec = pb.ZmachineSpec(
        flist=f"file://{flist}",
        cpu=1,
        memory_bytes=256 << 20,
        entrypoint="/bin/sh -c 'while :; do sleep 3600; done'",
        interfaces=[pb.NetworkInterface(network="lan")],
        restart_policy=pb.RESTART_POLICY_ALWAYS,
    )
    ref = pb.ZmachineRef(namespace="default", name="devenv-down", uid="7d0e5a2c-devenv-down")

    async def go() -> None:
        async with AgentClient(address, ClientTLS.from_dir(pki), timeout=180) as agent:
            machine = (await agent.deploy(ref, 1, spec)).machine
            # Deploy answers at once; the provisioning goes on in the background.
            while machine.state == pb.MACHINE_STATE_PROVISIONING:
                await asyncio.sleep(0.2)
                machine = await agent.get(ref.uid)
            assert machine.state == pb.MACHINE_STATE_RUNNING, machine

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while True:  # the agent takes a few seconds to listen
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    asyncio.run(go())


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(400)
def test_make_down_removes_the_vms_of_a_killed_agent_and_can_run_twice(
    cluster: ControlPlane,
    agent_guest_dir: Path,  # noqa: F811
    agent_busybox_flist: Path,  # noqa: F811
) -> None:
    # Short: virtiofsd's socket path under it must fit in a sockaddr_un (108 bytes).
    dev = Path(tempfile.mkdtemp(prefix="zmdev-", dir="/tmp"))
    netns = f"zmdown{os.getpid() % 100000}"
    env = {**os.environ, "ZMACHINE_DEV_DIR": str(dev), "ZMACHINE_DEV_NETNS": netns}
    (dev / "kubeconfig").write_text(cluster.kubeconfig.read_text())
    # devenv's own steps, run as `make run` runs them (its paths come from the environment).
    script = (
        "import sys; from pathlib import Path; from hack import devenv; devenv.network(); "
        "print(devenv.start_agent(Path(sys.argv[1]), Path(sys.argv[2]), devenv.dev_pki(), "
        "dict(__import__('os').environ)))"
    )
    started = subprocess.run(
        [sys.executable, "-c", script, str(agent_guest_dir), str(agent_busybox_flist.parent)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    address = started.stdout.strip().splitlines()[-1]
    state = dev / "agent"
    try:
        with OneVmmPerUid([state]).watching():
            _deploy(address, dev / "pki", agent_busybox_flist)
            assert vmm_pids_by_uid([state]), "no VMM runs after Deploy"
            agent = ProcessRef(**json.loads((dev / "pids" / "agent.pid").read_text()))
            os.killpg(agent.pid, signal.SIGKILL)  # the agent and nothing else: VMMs live on
            time.sleep(1)
            assert vmm_pids_by_uid([state]), "the VM should outlive its agent"
            assert leaks([state], netns), "nothing to clean up: the test would prove nothing"

            for attempt in (1, 2):
                down = subprocess.run(
                    [sys.executable, "-m", "hack.devenv", "down"],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
                )  # fmt: skip
                assert down.returncode == 0, f"make down #{attempt}: {down.stdout}{down.stderr}"
        assert leaks([state]) == []
        netns_left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert netns not in netns_left.stdout
    finally:
        subprocess.run([sys.executable, "-m", "hack.devenv", "down"], cwd=REPO, env=env,
                       capture_output=True, check=False)  # fmt: skip
        cluster.kubectl("delete", "zmn", "local", "--ignore-not-found", "--wait=false")
        cluster.kubectl("delete", "lease", "-n", "zmachine-system", "zmachine-node-local",
                        "--ignore-not-found")  # fmt: skip
        shutil.rmtree(dev, ignore_errors=True)
