"""Host-side work on a guest root stays inside it, whatever symlinks the flist holds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.guest.confined import open_in_root, remove_in_root
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import vm_pids_of


def victim(tmp_path: Path) -> Path:
    """A host directory holding files named like SSH host keys."""
    host = tmp_path / "host-etc-ssh"
    host.mkdir()
    for name in ("ssh_host_rsa_key", "ssh_host_ed25519_key", "sshd_config"):
        (host / name).write_text("host file\n")
    return host


@pytest.mark.parametrize("link", ["absolute", "dotdot"])
def test_remove_in_root_never_follows_a_link_out_of_the_root(tmp_path: Path, link: str) -> None:
    host = victim(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    target = str(host) if link == "absolute" else "../" * 12 + str(host).lstrip("/")
    (root / "etc/ssh").symlink_to(target)
    assert remove_in_root(root, "/etc/ssh", "ssh_host_") == []
    assert sorted(p.name for p in host.iterdir()) == [
        "ssh_host_ed25519_key", "ssh_host_rsa_key", "sshd_config",
    ]  # fmt: skip


def test_remove_in_root_resolves_links_inside_the_root(tmp_path: Path) -> None:
    host = victim(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "srv/ssh").mkdir(parents=True)
    (root / "etc/ssh").symlink_to("/srv/ssh")  # absolute, meant for the guest's /
    (root / "srv/ssh/ssh_host_rsa_key").write_text("image key\n")
    (root / "srv/ssh/ssh_host_ed25519_key").symlink_to(host / "ssh_host_ed25519_key")
    (root / "srv/ssh/sshd_config").write_text("kept\n")
    removed = remove_in_root(root, "/etc/ssh", "ssh_host_")
    assert removed == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    assert sorted(p.name for p in (root / "srv/ssh").iterdir()) == ["sshd_config"]
    assert (host / "ssh_host_ed25519_key").read_text() == "host file\n"  # the link went
    with pytest.raises(FileNotFoundError):
        open_in_root(root, "/etc/ssh/ssh_host_rsa_key", os.O_RDONLY)


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, agent_pki: Path, agent_guest_dir: Path
) -> Iterator[tuple[AgentProcess, Path]]:
    flists = tmp_path_factory.mktemp("hostile-flists")
    proc = agent_process(
        tmp_path_factory.mktemp("confined") / "state", agent_pki, None, agent_guest_dir, flists
    )
    with proc.running():
        yield proc, flists


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("link", ["absolute", "dotdot"])
def test_a_hostile_flist_cannot_make_the_agent_delete_host_files(
    agent: tuple[AgentProcess, Path], tmp_path: Path, link: str
) -> None:
    """The agent drops the image's SSH host keys on first creation of the root; an flist
    whose etc/ssh points at a host directory must not lose the host its files."""
    from controller.flist.pack import pack

    proc, flists = agent
    host = victim(tmp_path)
    root = tmp_path / "rootfs"
    for d in ("bin", "etc", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    target = str(host) if link == "absolute" else "../" * 12 + str(host).lstrip("/")
    (root / "etc/ssh").symlink_to(target)
    flist = flists / f"hostile-{link}.fl"
    pack(root, flist, [f"dir://{flists / 'store'}"])

    uid = f"hostile-{link}-{os.getpid()}"
    spec = pb.ZmachineSpec(
        flist=f"file://{flist}", cpu=1, memory_bytes=256 << 20,
        entrypoint="/bin/sh -c 'sleep 60'",
    )  # fmt: skip
    proc.deploy_settled(pb.ZmachineRef(namespace="default", name="hostile", uid=uid), 1, spec)
    try:
        assert sorted(p.name for p in host.iterdir()) == [
            "ssh_host_ed25519_key", "ssh_host_rsa_key", "sshd_config",
        ]  # fmt: skip
    finally:
        assert proc.call("delete", uid) is True
        assert vm_pids_of(uid) == []
