"""Image mode on a real agent: an flist carrying /image.raw, a bootable disk image built here
from Debian packages (a FAT "superfloppy" with syslinux, Debian's kernel and a tiny
initramfs), booted by QEMU's SeaBIOS under TCG.

The tests share one VM and run in file order, three guest boots in all: generation 1 is
deployed paused (so the host can compare the disk with the image before the guest writes
to it) and resumed by generation 2; generation 3 is a new VM on the same disk, and the
Restart RPC a new VMM on it again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.procs import cmdline
from hack.controlplane import guest_kernel_dir
from tests.agent.agent_harness import ROOT, AgentProcess
from tests.agent.conftest import agent_process
from tests.agent.test_agent_vm import mounts_under, vm_pids_of, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(300)]

UID = "5d1e2c7a-agent-image-test"
REF = pb.ZmachineRef(namespace="default", name="image-vm", uid=UID)
MARKER = "zm-image-mode-ok"
IMAGE_MIB = 24
DISK_BYTES = 64 << 20

# /init of the image's initramfs: counts its boots in a file on the boot disk (the
# guest's own write, which a re-copy of the image would wipe), reads its hostname from
# the cidata seed (the last disk, found by label), prints the marker and idles.
IMAGE_INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r m; do insmod /lib/modules/$m 2>/dev/null; done </lib/modules/load.order
mkdir -p /disk /seed
for i in $(seq 100); do seed=$(findfs LABEL=cidata) && break; sleep 0.1; done
mount -t vfat -o ro "$seed" /seed
mount -t vfat /dev/vda /disk
boots=$(( $(cat /disk/boots 2>/dev/null || echo 0) + 1 ))
echo $boots >/disk/boots
umount /disk
echo "{MARKER} boots=$boots $(grep local-hostname /seed/meta-data)"
while :; do sleep 3600; done
"""
SYSLINUX_CFG = """DEFAULT linux
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 panic=-1 quiet
"""


def debian_kernel() -> Path:
    """The kernel hack/build-guest-kernel.sh uses (its modules go into the initramfs)."""
    return guest_kernel_dir() / "vmlinuz"


def build_boot_image(work: Path, image: Path) -> None:
    """A bootable raw disk without a loop mount: mkfs.vfat on a file, syslinux (mtools
    based) installs its boot sector + ldlinux.sys, mcopy adds kernel, initrd and config."""
    init = work / "init"
    init.write_text(IMAGE_INIT)
    initrd = work / "initrd.img"
    subprocess.run(
        [ROOT / "hack/build-guest-kernel.sh", "--init", init, "--output", initrd],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (work / "syslinux.cfg").write_text(SYSLINUX_CFG)
    run = ["mkfs.vfat", "-C", "-n", "ZMIMAGE", str(image), str(IMAGE_MIB * 1024)]
    subprocess.run(run, check=True, capture_output=True)
    subprocess.run(["syslinux", "--install", str(image)], check=True, capture_output=True)
    files = {
        "vmlinuz": debian_kernel(),
        "initrd.img": initrd,
        "syslinux.cfg": work / "syslinux.cfg",
    }
    for name, src in files.items():
        subprocess.run(["mcopy", "-i", str(image), str(src), f"::{name}"], check=True)


@pytest.fixture(scope="module")
def image_flist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(.fl whose root holds only /image.raw, the image's bytes)."""
    from controller.flist.pack import pack

    if shutil.which("syslinux") is None:
        pytest.fail("syslinux is missing: run hack/install-system-deps.sh")
    base = tmp_path_factory.mktemp("image-flist")
    root = base / "root"
    root.mkdir()
    build_boot_image(base, root / "image.raw")
    flist = base / "image.fl"
    pack(root, flist, [f"dir://{base / 'store'}"])
    return flist, (root / "image.raw").read_bytes()


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_netns: str,
    image_flist: tuple[Path, bytes],
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("image") / "state"
    proc = agent_process(state, agent_pki, agent_netns, None, image_flist[0].parent)
    with proc.running():
        yield proc


def image_spec(flist: Path, **changes: object) -> pb.ZmachineSpec:
    """A data share mounted first, then the boot disk: the first *disk* mount boots."""
    spec = pb.ZmachineSpec(
        flist=f"file://{flist}",
        cpu=1,
        memory_bytes=256 << 20,
        hostname="imagehost",
        env={"IGNORED": "in-image-mode"},
        volumes=[
            pb.Volume(name="shared", kind=pb.VOLUME_KIND_SHARE),
            pb.Volume(name="spare", kind=pb.VOLUME_KIND_DISK, size_bytes=8 << 20),
            pb.Volume(name="boot", kind=pb.VOLUME_KIND_DISK, size_bytes=DISK_BYTES),
        ],
        mounts=[
            pb.Mount(name="shared", mountpoint="/srv"),
            pb.Mount(name="boot", mountpoint="/boot-disk"),
            pb.Mount(name="spare", mountpoint="/spare"),
        ],
        restart_policy=pb.RESTART_POLICY_NEVER,
    )
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


def provisioning_error(agent: AgentProcess, spec: pb.ZmachineSpec) -> str:
    """Deploy answers Provisioning at once; the refusal shows as FAILED (ProvisionFailed)
    with the message naming the field. Deleted afterwards, leaving nothing."""
    m = agent.deploy_settled(REF, 1, spec).machine
    assert m.state == pb.MACHINE_STATE_FAILED and m.reason == "ProvisionFailed", m
    assert agent.call("delete", UID) is True
    return m.message


def nothing_left(agent: AgentProcess) -> None:
    assert vm_pids_of(UID) == [], [cmdline(p) for p, _ in vm_pids_of(UID)]
    assert mounts_under(agent.state_dir) == []
    assert not (agent.state_dir / "vms" / UID).exists()
    assert not (agent.state_dir / "machines" / f"{UID}.json").exists()


def agent_events(agent: AgentProcess) -> list[dict[str, Any]]:
    """The agent's structlog lines (JSON, one per line)."""
    lines = agent.log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def disk_file(agent: AgentProcess) -> Path:
    return agent.state_dir / "vms" / UID / "disks/boot.img"


def test_image_mode_without_a_disk_mount_is_refused(
    agent: AgentProcess, image_flist: tuple[Path, bytes]
) -> None:
    spec = image_spec(image_flist[0])
    del spec.mounts[1:]  # only the share is mounted: no boot disk
    message = provisioning_error(agent, spec)
    assert "image mode needs spec.mounts[0] to name a disk volume" in message
    nothing_left(agent)


def test_an_image_larger_than_the_disk_is_refused_naming_both_sizes(
    agent: AgentProcess, image_flist: tuple[Path, bytes]
) -> None:
    spec = image_spec(image_flist[0])
    spec.volumes[2].size_bytes = 16 << 20
    details = provisioning_error(agent, spec)
    assert "spec.volumes[2] ('boot', the boot disk)" in details
    assert f"{16 << 20} bytes" in details and f"({IMAGE_MIB << 20} bytes)" in details
    nothing_left(agent)


def test_image_is_copied_onto_the_blank_boot_disk(
    agent: AgentProcess, image_flist: tuple[Path, bytes]
) -> None:
    flist, image = image_flist
    # Paused from the start: SeaBIOS has not read the disk yet, and the guest not written.
    resp = agent.deploy_settled(REF, 1, image_spec(flist, paused=True))
    assert isinstance(resp, pb.DeployResponse)
    m = resp.machine
    assert m.boot_mode == pb.BOOT_MODE_IMAGE and m.state == pb.MACHINE_STATE_PAUSED
    disk = disk_file(agent)
    assert disk.stat().st_size == DISK_BYTES  # the volume's size, not the image's
    data = disk.read_bytes()
    assert data[: len(image)] == image
    assert data[len(image) :] == bytes(DISK_BYTES - len(image))
    assert disk.stat().st_blocks * 512 < DISK_BYTES  # holes kept: the copy is sparse
    # The other disk stays raw (the image's OS owns it); the flist is unmounted again and
    # no virtio-fs root is served, only the share volume.
    assert (agent.state_dir / "vms" / UID / "disks/spare.img").read_bytes() == bytes(8 << 20)
    assert mounts_under(agent.state_dir) == []
    argvs = [cmdline(pid) for pid, _ in vm_pids_of(UID)]
    served = {
        a[a.index("--shared-dir") + 1] for a in argvs if "--shared-dir" in a
    }  # Rust virtiofsd
    assert served == {str(agent.state_dir / "vms" / UID / "shares/shared")}, argvs
    progress = [
        e["percent"] for e in agent_events(agent) if e["event"] == "disk image copy progress"
    ]
    assert progress == list(range(10, 101, 10)), progress


def test_image_boots_with_the_seed_attached(
    agent: AgentProcess, image_flist: tuple[Path, bytes]
) -> None:
    pid = agent.call("get", UID).pid  # type: ignore[attr-defined]
    resp = agent.deploy_settled(REF, 2, image_spec(image_flist[0]))
    assert isinstance(resp, pb.DeployResponse)
    assert resp.machine.pid == pid and resp.machine.state == pb.MACHINE_STATE_RUNNING
    console = Path(resp.machine.console_log)
    wait_for(
        "the image's marker on the serial log",
        lambda: f"{MARKER} boots=1 local-hostname: imagehost" in console.read_text(),
        timeout=150,
    )
    seed = subprocess.run(
        ["mtype", "-i", str(agent.state_dir / "vms" / UID / "seed.img"), "::zosrc"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "IGNORED" not in seed.stdout  # env does not apply to an image's own OS


def test_new_generation_keeps_what_the_guest_wrote(
    agent: AgentProcess, image_flist: tuple[Path, bytes]
) -> None:
    old = agent.call("get", UID).pid  # type: ignore[attr-defined]
    resp = agent.deploy_settled(REF, 3, image_spec(image_flist[0], memory_bytes=320 << 20))
    assert isinstance(resp, pb.DeployResponse) and resp.changed
    assert resp.machine.pid not in (0, old) and resp.machine.boot_mode == pb.BOOT_MODE_IMAGE
    console = Path(resp.machine.console_log)
    # boots=2: the guest's counter survived, the image was not copied over it.
    wait_for(
        "the second boot's marker",
        lambda: f"{MARKER} boots=2" in console.read_text(),
        timeout=150,
    )
    assert "boot disk in use, image not copied" in [e["event"] for e in agent_events(agent)]


def test_restart_rpc_boots_the_same_disk_without_any_mount(agent: AgentProcess) -> None:
    old = agent.call("get", UID)
    m = agent.call("restart", UID)
    assert isinstance(m, pb.Machine) and isinstance(old, pb.Machine)
    assert m.pid not in (0, old.pid) and m.restarts == old.restarts + 1
    assert mounts_under(agent.state_dir) == []  # the disk is the root: nothing to mount
    console = Path(m.console_log)
    wait_for("the third boot's marker", lambda: f"{MARKER} boots=3" in console.read_text())


def test_delete_leaves_nothing_behind(agent: AgentProcess) -> None:
    assert agent.call("delete", UID) is True
    nothing_left(agent)
    assert agent.call("list") == []
