"""The seed's guide as a test (marker seedguide): zos's guide to a VM of one's own, with Debian 12.

hack/build-debian-vm-root.sh (cached) debootstraps the root as the guide does: a kernel with
/boot/vmlinuz and /boot/initrd.img, virtiofs in the initramfs, cloud-init, openssh-server;
and a small container image (buildah, `docker save` format) whose config names its
entrypoint and working directory. Each goes the user's way: `tar -czf` (the VM root),
`zmachine-flist push` to a real zmachine-hub, a Zmachine manifest with SSH_KEY in its env
(through the controller's translation to the agent's spec), the real agent booting it from the
hub's URL under QEMU/TCG; then the test logs in over SSH from the test's network namespace.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.network.local import netns_argv
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.api.zmachine import ZmachineSpec
from controller.operator.translate import agent_spec, resolve_env
from hack.controlplane import debian_vm_root_dir
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.flist.conftest import TOKEN, RunningHub, run_cli, start_hub, stop_hub
from tests.netns import bridged_netns

pytestmark = [
    pytest.mark.seedguide, pytest.mark.e2e, pytest.mark.qemu, pytest.mark.fuse,
    # The first run builds the guests (9-16 min); a TCG boot of Debian takes 10-20 min.
    pytest.mark.timeout(3600),
]  # fmt: skip

NAMESPACE = "guide"
BOOT_WITHIN = 1800.0  # systemd + cloud-init under TCG: ~10 min on a 2-core machine others load
STATUS = "cloud-init status || true"  # exits 1 on error; the text says which


@pytest.fixture(scope="module")
def guests() -> Path:
    """The cached build: root/ (the VM root) and app-image.tar (the container image)."""
    return debian_vm_root_dir()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    base = tmp_path_factory.mktemp("hub")
    tokens = base / "tokens"
    tokens.write_text(f"{TOKEN} alice\n")
    running = start_hub(base, "--token-file", str(tokens), max_upload_mib=2048)
    yield running
    stop_hub(running)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """The test's own namespace: bridge zmbr0 (10.231.0.1/24), the guests' taps, the ssh client."""
    with bridged_netns("zmguide", "zmbr0", "10.231.0.1/24") as name:
        yield name


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, agent_pki: Path, agent_guest_dir: Path, netns: str
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("guide") / "state"
    with agent_process(state, agent_pki, netns, agent_guest_dir).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private keys: "user" goes into SSH_KEY, "stranger" nowhere."""
    base = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("user", "stranger"):
        key = base / name
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@guide", "-f", key],
            check=True,
        )  # fmt: skip
        found[name] = key
    return found


def push(hub: RunningHub, path: Path) -> str:
    """`zmachine-flist push` as a user runs it; the flist's URL on the hub."""
    out = run_cli("push", str(path), "--hub", hub.url, "--token-file", str(hub.token_file), "-q")
    url = out.stdout.strip()
    assert url.startswith(f"{hub.url}/alice/") and url.endswith(".fl"), out
    return url


def deploy(agent: AgentProcess, name: str, flist: str, memory: str, key: Path) -> pb.Machine:
    """A Zmachine as the guide writes it, with the public half of ``key`` in SSH_KEY; its
    spec as the controller sends it, on the agent's local network."""
    spec = ZmachineSpec.model_validate({
        "flist": flist,
        "computeCapacity": {"cpu": 1, "memory": memory},
        "env": [{"name": "SSH_KEY", "value": key.with_suffix(".pub").read_text().strip()}],
    })  # fmt: skip
    env = resolve_env(spec, NAMESPACE, lambda namespace, secret: None)
    lan = [pb.NetworkInterface(network="lan")]
    ref = pb.ZmachineRef(namespace=NAMESPACE, name=name, uid=f"{name}-{time.time_ns()}")
    deployed = agent.deploy_settled(ref, 1, agent_spec(spec, name, env, lan), timeout=600)
    assert isinstance(deployed, pb.DeployResponse)
    machine = deployed.machine
    assert machine.state == pb.MACHINE_STATE_RUNNING, machine
    return machine


def ssh(netns: str, key: Path, ip: str, command: str) -> subprocess.CompletedProcess[str]:
    """The system's ssh client, in the test's namespace (its network only: nsenter)."""
    argv = [
        *netns_argv(netns), "ssh", "-i", str(key), "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=60", "-o", "LogLevel=ERROR",
        f"root@{ip}", command,
    ]  # fmt: skip
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired as exc:  # a guest still booting may stall a session
        return subprocess.CompletedProcess(argv, 255, "", f"timed out: {exc}")


def login(netns: str, key: Path, machine: pb.Machine, command: str) -> str:
    """``command``'s output once root can log in with ``key`` (sshd and the key may come late
    in the boot); fails with the serial console's tail otherwise."""
    ip = machine.interfaces[0].ip
    deadline = time.monotonic() + BOOT_WITHIN
    last = None
    while time.monotonic() < deadline:
        last = ssh(netns, key, ip, command)
        if last.returncode == 0:
            return last.stdout
        time.sleep(5)
    console = Path(machine.console_log).read_text(errors="replace")[-4000:]
    pytest.fail(f"no SSH login to {ip} within {BOOT_WITHIN:.0f}s: {last}\n{console}")


def refused(netns: str, key: Path, machine: pb.Machine) -> str:
    result = ssh(netns, key, machine.interfaces[0].ip, "true")
    assert result.returncode == 255, result
    return result.stderr


def delete_and_check_clean(agent: AgentProcess, machine: pb.Machine) -> None:
    uid = machine.ref.uid
    assert agent.call("delete", uid) is True
    assert uid not in Path("/proc/mounts").read_text()
    assert not [p for p in agent.state_dir.rglob("*") if uid in str(p)]
    running = subprocess.run(["pgrep", "-f", uid], capture_output=True, text=True)
    assert running.stdout == "", running.stdout


def test_vm_root_from_debootstrap_boots_its_own_kernel_and_cloud_init_sets_name_and_key(
    guests: Path,
    hub: RunningHub,
    agent: AgentProcess,
    netns: str,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    root = guests / "root"
    # What makes the login below able to fail: no key in the image, no hostname.
    assert not (root / "root/.ssh/authorized_keys").exists()
    assert not (root / "etc/hostname").exists()
    (kernel_release,) = [p.name for p in (root / "lib/modules").iterdir()]
    assert (root / "boot/vmlinuz").resolve() == root / f"boot/vmlinuz-{kernel_release}"
    archive = tmp_path / "debian-12.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(root), "."], check=True)
    url = push(hub, archive)
    assert url == f"{hub.url}/alice/debian-12.fl"

    machine = deploy(agent, "guide-vm", url, "768Mi", keys["user"])
    assert machine.boot_mode == pb.BOOT_MODE_VM
    out = login(
        netns, keys["user"], machine,
        "hostname; uname -r; findmnt -no FSTYPE /; cat /root/.ssh/authorized_keys",
    )  # fmt: skip
    hostname, release, root_type, *authorized = out.splitlines()
    assert hostname == "guide-vm"
    assert release == kernel_release  # the flist's own kernel, not the agent's
    assert root_type == "virtiofs"
    # cloud-init's doing: the image had no key.
    assert authorized == [keys["user"].with_suffix(".pub").read_text().strip()]
    # cloud-init ran every stage without an error (status: error otherwise).
    deadline = time.monotonic() + BOOT_WITHIN
    while "status: done" not in (status := login(netns, keys["user"], machine, STATUS)):
        assert "status: running" in status and time.monotonic() < deadline, status
        time.sleep(5)
    assert "Permission denied" in refused(netns, keys["stranger"], machine)
    delete_and_check_clean(agent, machine)


def test_container_image_from_buildah_runs_its_entrypoint_in_its_workdir(
    guests: Path, hub: RunningHub, agent: AgentProcess, netns: str, keys: dict[str, Path]
) -> None:
    url = push(hub, guests / "app-image.tar")
    assert url == f"{hub.url}/alice/app-image.fl"
    machine = deploy(agent, "guide-ct", url, "256Mi", keys["user"])
    assert machine.boot_mode == pb.BOOT_MODE_CONTAINER
    # The image's config (not the spec) named /srv/app/start and /srv/app: sshd answers only
    # if it ran, and it wrote where it started.
    out = login(netns, keys["user"], machine, "hostname; cat /run/entrypoint-cwd")
    assert out.splitlines() == ["guide-ct", "/srv/app"]
    assert "Permission denied" in refused(netns, keys["stranger"], machine)
    delete_and_check_clean(agent, machine)
