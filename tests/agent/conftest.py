"""Fixtures of tests/agent. The agent engineer's are prefixed ``agent_``."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.rpc.tls import write_dev_pki
from hack.controlplane import guest_kernel_dir, standin_vmm_path, virtiofsd_path
from tests.agent.agent_harness import AgentProcess
from tests.netns import bridged_netns

AGENT_GREETING_VAR = "ZM_GREETING"
# The entrypoint prints the env var given in the spec, then idles as the guest's PID 1.
AGENT_ENTRYPOINT = (
    "/bin/sh -c 'echo zm-test-entry $" + AGENT_GREETING_VAR + "; "
    'grep -E " /(data|srv) " /proc/mounts; echo from-guest > /srv/hello; '
    "while :; do sleep 3600; done'"
)


@pytest.fixture(scope="session")
def agent_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("agent-pki")
    write_dev_pki(directory)
    return directory


@pytest.fixture(scope="session")
def agent_guest_dir() -> Path:
    """vmlinuz + initramfs.img for container mode, built (cached) from Debian packages."""
    return guest_kernel_dir()


@pytest.fixture(scope="session")
def guest_virtiofsd() -> Path:
    """The Rust virtiofsd pinned in hack/versions.env, built (cached) from crates.io."""
    return virtiofsd_path()


@pytest.fixture(scope="session")
def agent_busybox_flist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A container-mode .fl built from Debian's busybox-static, blocks in a dir:// store."""
    from controller.flist.pack import pack

    base = tmp_path_factory.mktemp("agent-flist")
    root = base / "rootfs"
    for d in ("bin", "etc/ssh", "tmp", "root", "proc", "dev", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "echo", "sleep", "cat", "ls", "grep", "test", "[", "poweroff"):
        (root / "bin" / applet).symlink_to("busybox")
    # A host key as if the image shipped one: the agent must drop it on first creation.
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("not a real key\n")
    flist = base / "busybox.fl"
    pack(root, flist, [f"dir://{base / 'store'}"])
    return flist


@pytest.fixture(scope="module")
def agent_strict(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_busybox_flist: Path,
) -> Iterator[AgentProcess]:
    """An agent that gives up after one restart (--crash-loop-limit 1), for restart-policy
    tests with the busybox flist; one per test module."""
    state = tmp_path_factory.mktemp("strict") / "state"
    proc = agent_process(
        state, agent_pki, None, agent_guest_dir, agent_busybox_flist.parent,
        "--crash-loop-limit", "1",
    )  # fmt: skip
    with proc.running():
        yield proc


@pytest.fixture(scope="module")
def agent_netns() -> Iterator[str]:
    """A network namespace with bridge zmbr0 (10.231.0.1/24): taps and guests live there."""
    with bridged_netns("zmagent", "zmbr0", "10.231.0.1/24") as name:
        yield name


@pytest.fixture
def agent_state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def agent_process(
    state: Path,
    pki: Path,
    netns: str | None,
    guest_dir: Path | None,
    flist_dir: Path | None = None,
    *more: str,
) -> AgentProcess:
    """An agent for tests: TCG, fast supervision, taps on zmbr0 (in ``netns`` if given)."""
    extra = ["--node-name", "test-node", "--cidr", "10.231.0.0/24", "--bridge", "zmbr0", *more]
    extra += ["--virtiofsd", str(virtiofsd_path())]  # the default daemon, as production runs it
    if flist_dir:
        extra += ["--flist-dir", str(flist_dir)]
    if netns:
        extra += ["--netns", netns]
    if guest_dir:
        extra += ["--guest-kernel-dir", str(guest_dir)]
    return AgentProcess(state, pki, extra)


@pytest.fixture(scope="session")
def agent_standin_guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Container-mode assets for the stand-in VMM, which boots nothing: placeholders."""
    directory = tmp_path_factory.mktemp("standin-guest")
    for name in ("vmlinuz", "initramfs.img"):
        (directory / name).write_text("not a kernel: the stand-in VMM boots nothing\n")
    return directory


def standin_agent_process(
    state: Path, pki: Path, netns: str | None, guest_dir: Path, flist_dir: Path, *more: str
) -> AgentProcess:
    """An agent whose VMM is the stand-in for cloud-hypervisor (tests/bench/standin_vmm.c):
    real FUSE, overlay, taps and virtiofsd; no guest."""
    return agent_process(
        state, pki, netns, guest_dir, flist_dir,
        "--hypervisor", "cloud-hypervisor", "--vmm-binary", str(standin_vmm_path()), *more,
    )  # fmt: skip


# --- guest boot layer (prefix guest_) --------------------------------------------------

GUEST_APPLETS = ("sh", "echo", "cat", "sleep", "poweroff", "ping", "hostname", "uname", "ls")


def guest_busybox_root(root: Path) -> Path:
    """A container root: Debian's static busybox with a few applet links."""
    for d in ("bin", "etc", "root", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in GUEST_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def guest_install_binary(root: Path, binary: Path) -> Path:
    """Copy a dynamically linked host binary into ``root`` at the same path, with the
    shared libraries ``ldd`` names (and the loader), so it runs chrooted there."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True)
    libs = [Path(w) for line in out.stdout.splitlines() for w in line.split() if w.startswith("/")]
    for path in [binary, *libs]:
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)
    return root / binary.relative_to("/")


@pytest.fixture(scope="module")
def guest_netns() -> Iterator[tuple[str, str, str]]:
    """(netns, bridge, bridge IP/24): a namespace of the test's own for taps and guests."""
    bridge, cidr = "zmgbr0", "10.232.0.1/24"
    with bridged_netns("zmguest", bridge, cidr) as name:
        yield name, bridge, cidr
