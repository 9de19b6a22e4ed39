"""Real guests under QEMU/TCG: our kernel + initramfs, virtiofsd roots, the cidata seed, taps.

Each test boots one guest (~10-30 s under TCG on a busy 2-core machine) and reads what the
guest printed on its serial console. With ``serial_pty`` the console is read from QEMU's
PTY by the agent's ConsoleStream, as in production.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from controller.agent.guest.exitmarker import EntrypointExit, find_exit, new_nonce
from controller.agent.guest.seed import Interface, Mount, Route, SeedConfig, write_seed
from controller.agent.guest.virtiofs import QEMU_VIRTIOFSD, Flavor, Virtiofsd, start_virtiofsd
from controller.agent.guest.vmconfig import BootMode, Disk, FsShare, Nic, VMConfig, detect_boot
from controller.agent.guest.vmconfig import kernel_cmdline as make_cmdline
from controller.agent.hypervisor import VM, ExitRecord, GuestEvent, GuestExit, Qemu
from controller.agent.network.local import create_tap, delete_tap, mac_address, tap_name
from controller.agent.runtime.console import ConsoleStream
from controller.agent.runtime.procs import ProcessRef, cmdline, terminate
from hack.controlplane import virtiofsd_path
from tests.agent.conftest import guest_busybox_root, guest_install_binary

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
BOOT_WITHIN = 150.0  # seconds for a TCG boot to reach the entrypoint, with margin


def serial_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def guest_ended(vm: VM, within: float = 60) -> ExitRecord:
    """Once the guest has ended (QEMU runs with -no-shutdown: a power-off keeps it up
    until the agent, here guest_exit(), ends it), why."""
    deadline = time.monotonic() + within
    while (ended := await vm.guest_exit()) is None:
        assert time.monotonic() < deadline, "the guest did not end"
        await asyncio.sleep(0.25)
    assert await vm.wait(10), "QEMU still runs after its guest ended"
    return ended


async def wait_for(path: Path, text: str, within: float = BOOT_WITHIN) -> str:
    """Serial log content once a line starts with ``text`` (so the init's echo of the
    command does not count); fails with the log otherwise."""
    deadline = time.monotonic() + within
    content = ""
    while time.monotonic() < deadline:
        content = serial_text(path)
        if any(line.startswith(text) for line in content.splitlines()):
            return content
        await asyncio.sleep(0.25)
    pytest.fail(f"{text!r} not on the serial console within {within:.0f}s:\n{content[-3000:]}")


@asynccontextmanager
async def running_vm(
    tmp: Path,
    root: Path,
    assets: tuple[Path, Path | None],
    cmdline: str,
    seed: SeedConfig | None = None,
    extra_shares: dict[str, Path] | None = None,
    nics: list[Nic] | None = None,
    netns: str | None = None,
    elsewhere: bool = False,
    data_disks: list[Disk] | None = None,
    serial_pty: bool = False,
    daemon: Virtiofsd | None = None,
) -> AsyncIterator[tuple[VM, VMConfig]]:
    """virtiofsd per share, the seed disk, then QEMU under TCG; everything stopped after.

    ``elsewhere``: QEMU is started by another Python process that exits right away (an
    agent restart), and this one adopts it from the pid file.
    """
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    shares = [FsShare("vroot", run / "fs-vroot.sock", root)]
    shares += [FsShare(tag, run / f"fs-{tag}.sock", d) for tag, d in (extra_shares or {}).items()]
    helpers: list[ProcessRef] = []
    disks = list(data_disks or [])  # vda, vdb... then the seed last, as the agent does
    if seed is not None:
        disks.append(Disk(write_seed(seed, tmp / "seed.img"), readonly=True))
    cfg = VMConfig(
        vm_id=tmp.name,
        cpus=1,
        memory_mib=256,
        kernel=assets[0],
        initrd=assets[1],
        cmdline=cmdline,
        shares=shares,
        disks=disks,
        nics=nics or [],
        serial_log=tmp / "serial.log",
        api_socket=run / "qmp.sock",
        state_dir=tmp / "state",
        netns=netns,
        serial_pty=serial_pty,
    )
    vm: VM | None = None
    console: asyncio.Task[None] | None = None
    daemon = daemon or Virtiofsd(virtiofsd_path(), Flavor.RUST)  # the agent's default
    try:
        for share in shares:
            log = tmp / f"virtiofsd-{share.tag}.log"
            helpers.append(await start_virtiofsd(share, log, daemon=daemon))
        vm = await (start_elsewhere(cfg) if elsewhere else Qemu(accel="tcg").start(cfg))
        if serial_pty:  # what the agent does: it owns the console
            stream = ConsoleStream(cfg.serial_log, 1 << 20, 1)
            console = asyncio.create_task(stream.follow(vm))
        yield vm, cfg
    finally:
        if vm is not None:
            await vm.stop(grace=1, hard_grace=5, term_grace=5)
        if console is not None:
            await asyncio.wait_for(console, 5)
        for ref in helpers:
            await terminate(ref, grace=2)


def container_vm(
    tmp: Path,
    root: Path,
    guest_dir: Path,
    seed: SeedConfig,
    serial_pty: bool = False,
    daemon: Virtiofsd | None = None,
    nonce: str = "",
) -> AbstractAsyncContextManager[tuple[VM, VMConfig]]:
    """running_vm for a container-mode guest (our kernel + initramfs, the seed)."""
    assets = (guest_dir / "vmlinuz", guest_dir / "initramfs.img")
    cmdline = make_cmdline(BootMode.CONTAINER, nonce=nonce)
    return running_vm(tmp, root, assets, cmdline, seed=seed, serial_pty=serial_pty, daemon=daemon)


def _start_and_exit(cfg: VMConfig) -> None:
    asyncio.run(Qemu(accel="tcg").start(cfg))


async def start_elsewhere(cfg: VMConfig) -> VM:
    starter = multiprocessing.get_context("spawn").Process(target=_start_and_exit, args=(cfg,))
    starter.start()
    await asyncio.to_thread(starter.join, 60)
    assert starter.exitcode == 0, "the starting process failed"
    vm = Qemu(accel="tcg").adopt(cfg)
    assert vm is not None, "the VM did not outlive the process that started it"
    return vm


def test_container_mode_runs_the_entrypoint_with_env_network_mounts_and_keys(
    tmp_path: Path, agent_guest_dir: Path, guest_netns: tuple[str, str, str]
) -> None:
    """Also: env names of the init's own variables reach the entrypoint without changing
    the init; mount targets with non-ASCII names and behind an absolute symlink land in
    the root; the image's real ssh-keygen runs although the image's /dev is empty;
    cgroup2 is mounted."""
    netns, bridge, bridge_cidr = guest_netns
    gateway = bridge_cidr.split("/")[0]
    root = guest_busybox_root(tmp_path / "root")
    (root / "bin/ip").symlink_to("busybox")
    (root / "bin/grep").symlink_to("busybox")
    (root / "etc/ssh").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    guest_install_binary(root, Path("/usr/bin/ssh-keygen"))
    assert not list((root / "dev").iterdir())
    (root / "var/srv").mkdir(parents=True)
    (root / "srv").symlink_to("/var/srv")  # absolute: must resolve inside the root
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("from-a-second-share\n")
    disk_dir = tmp_path / "disk-content"
    disk_dir.mkdir()
    (disk_dir / "disk.txt").write_text("from-an-ext4-disk\n")
    disk = Disk(tmp_path / "vol.img")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", disk_dir, disk.path, "16M"], check=True, timeout=60
    )
    uid = f"vm-{tmp_path.name}"
    nic = Nic(tap_name(uid, 0), mac_address(uid, 0))
    create_tap(nic.tap, bridge, netns)
    entry = (
        "echo hello $GREETING from $(hostname); cat /srv/data/note.txt /völume/disk.txt; "
        'echo "env ROOT=$ROOT SEED=$SEED init=$init"; '
        "cat /root/.ssh/authorized_keys; ip -4 route; ip -6 route; grep cgroup2 /proc/mounts; "
        f"ping -c 1 -W 10 {gateway} >/dev/null && echo ping-bridge-ok; sleep 3; poweroff -f"
    )
    seed = SeedConfig(
        instance_id=uid,
        hostname="web-1",
        interfaces=[
            Interface(
                nic.mac,
                ["10.232.0.77/24", "fd00:232::77/64"],
                gateway4=gateway,
                gateway6="fd00:232::1",
                routes=[Route("10.99.0.0/16", gateway)],
            )
        ],
        nameservers=[gateway],
        ssh_keys=["ssh-ed25519 AAAAtestkey testér@zm"],
        mounts=[Mount("data", "/srv/data", "virtiofs"), Mount("vda", "/völume")],
        # The init's own variable names: they must not steer the init.
        env={"GREETING": "zmachine world", "ROOT": "/nowhere", "SEED": "/x", "init": "/y"},
        entrypoint=f"/bin/sh -c '{entry}'",
    )
    assets = detect_boot(root, agent_guest_dir)
    assert assets.mode is BootMode.CONTAINER

    async def scenario() -> None:
        async with running_vm(
            tmp_path,
            root,
            (assets.kernel, assets.initrd),
            make_cmdline(BootMode.CONTAINER),
            seed=seed,
            extra_shares={"data": data},
            nics=[nic],
            netns=netns,
            data_disks=[disk],
        ) as (vm, cfg):
            log = await wait_for(cfg.serial_log, "ping-bridge-ok")
            assert "hello zmachine world from web-1" in log
            assert "from-a-second-share" in log
            assert "from-an-ext4-disk" in log
            assert "env ROOT=/nowhere SEED=/x init=/y" in log
            assert "ssh-ed25519 AAAAtestkey testér@zm" in log
            assert f"default via {gateway} dev eth0" in log
            assert f"10.99.0.0/16 via {gateway} dev eth0" in log
            assert "default via fd00:232::1 dev eth0" in log
            assert "cgroup2 /sys/fs/cgroup cgroup2" in log
            assert "zm-init: SSH host keys present" in log
            seed_disk = (await vm.counters())["disk1"]
            assert seed_disk["read_bytes"] > 0 and seed_disk["write_bytes"] == 0
            assert (await guest_ended(vm)).exit is GuestExit.POWEROFF

    try:
        asyncio.run(scenario())
        # The init wrote these into the root, where the host sees them too.
        assert (root / "etc/resolv.conf").read_text() == f"nameserver {gateway}\n"
        assert (root / "root/.ssh/authorized_keys").read_text().count("AAAAtestkey") == 1
        assert (root / "etc/hostname").read_text() == "web-1\n"
        assert "127.0.1.1\tweb-1" in (root / "etc/hosts").read_text()
        keys = sorted(k.name for k in (root / "etc/ssh").glob("ssh_host_*_key"))
        assert keys == ["ssh_host_ecdsa_key", "ssh_host_ed25519_key", "ssh_host_rsa_key"]
        assert (root / "völume").is_dir() and (root / "var/srv/data").is_dir()
    finally:
        delete_tap(nic.tap, netns)


def test_vm_mode_boots_the_roots_own_kernel_and_initrd(
    tmp_path: Path, agent_guest_dir: Path
) -> None:
    """Also: the VM outlives the process that started it and is adopted; the serial PTY;
    pause/resume, stats and the stop escalation on the adopted handle."""
    root = guest_busybox_root(tmp_path / "root")
    (root / "boot").mkdir()
    shutil.copy2(agent_guest_dir / "vmlinuz", root / "boot/vmlinuz-6.1")
    (root / "boot/vmlinuz").symlink_to("/boot/vmlinuz-6.1")  # absolute: resolved in the root
    init = tmp_path / "vm-init"
    init.write_text(VM_MODE_INIT)
    subprocess.run(
        [REPO / "hack/build-guest-kernel.sh", "--init", init, "--output", root / "boot/initrd.img"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assets = detect_boot(root, agent_guest_dir)
    assert assets.mode is BootMode.VM
    assert assets.kernel == root / "boot/vmlinuz-6.1"
    assert assets.initrd == root / "boot/initrd.img"
    entry = "/bin/sh -c 'echo vm-mode kernel $(uname -r); while :; do echo tick; sleep 1; done'"
    asyncio.run(_vm_mode_scenario(tmp_path, root, (assets.kernel, assets.initrd), entry))


async def _vm_mode_scenario(
    tmp_path: Path, root: Path, assets: tuple[Path, Path | None], entry: str
) -> None:
    cmdline = make_cmdline(BootMode.VM, entry)
    async with running_vm(tmp_path, root, assets, cmdline, elsewhere=True, serial_pty=True) as (
        vm,
        cfg,
    ):
        log = await wait_for(cfg.serial_log, "vm-mode kernel 6.1")  # logged with a PTY too
        assert "flist-initrd: switching to /bin/sh" in log
        await wait_for(cfg.serial_log, "tick")
        pty = await vm.console_pty()
        assert pty is not None and pty.startswith("/dev/pts/")

        await vm.pause()
        stats = await vm.stats()
        assert stats.state == "paused"
        assert stats.cpu_seconds > 0 and stats.rss_bytes > 64 << 20  # QEMU + touched guest RAM
        ticks = serial_text(cfg.serial_log).count("tick")
        await asyncio.sleep(2.5)
        assert serial_text(cfg.serial_log).count("tick") <= ticks + 1  # at most one in flight
        await vm.resume()
        assert (await vm.stats()).state == "running"
        deadline = time.monotonic() + 30
        while serial_text(cfg.serial_log).count("tick") < ticks + 2:
            assert time.monotonic() < deadline, "no ticks after resume"
            await asyncio.sleep(0.25)

        # The guest ignores the ACPI button (no acpid), so stop must escalate to quit.
        started = time.monotonic()
        status = await vm.stop(grace=2, hard_grace=10, term_grace=5)
        assert time.monotonic() - started < 15
        assert not vm.alive()
        assert status is None  # another process started it: its exit status is not ours
        assert Qemu(accel="tcg").adopt(cfg) is None
        assert not cfg.pid_file.exists()


def test_boot_failure_is_reported_on_the_console_and_powers_off(
    tmp_path: Path, agent_guest_dir: Path
) -> None:
    root = guest_busybox_root(tmp_path / "root")
    seed = SeedConfig(instance_id="broken", hostname="broken", entrypoint="/usr/bin/missing")
    asyncio.run(_failure_scenario(tmp_path, root, agent_guest_dir, seed))


async def _failure_scenario(
    tmp_path: Path, root: Path, agent_guest_dir: Path, seed: SeedConfig
) -> None:
    nonce = new_nonce()
    async with container_vm(tmp_path, root, agent_guest_dir, seed, nonce=nonce) as (vm, cfg):
        log = await wait_for(cfg.serial_log, "zm-init: FATAL")
        assert "entrypoint '/usr/bin/missing' does not exist" in log
        assert (await guest_ended(vm)).exit is GuestExit.POWEROFF
        assert find_exit(cfg.serial_log.read_bytes(), nonce) == EntrypointExit(127, "NotFound")


def test_reboot_and_panic_keep_the_vm_and_its_console(
    tmp_path: Path, agent_guest_dir: Path
) -> None:
    """``reboot=k panic=1``: a reboot and a panic both reset the guest inside the same
    QEMU (virtiofsd keeps serving the root across the reset), the console keeps every
    boot's output, the QMP events record both resets, and only the final power-off ends
    the VM, classified as such."""
    root = guest_busybox_root(tmp_path / "root")
    entry = (
        "/bin/sh -c 'n=$(cat /boots 2>/dev/null || echo 0); n=$((n+1)); echo $n >/boots; "
        'echo "zm-boot $n"; '
        "if [ $n = 1 ]; then /bin/busybox reboot -f; "
        "elif [ $n = 2 ]; then echo c >/proc/sysrq-trigger; "
        "else /bin/busybox poweroff -f; fi'"
    )
    seed = SeedConfig(instance_id="rb", hostname="rb", entrypoint=entry)

    async def scenario() -> None:
        async with container_vm(tmp_path, root, agent_guest_dir, seed, serial_pty=True) as (
            vm,
            cfg,
        ):
            seen: list[GuestEvent] = []
            follower = asyncio.create_task(vm.follow_events(seen.append))
            virtiofsd_before = sorted(p.pid for p in _virtiofsd_refs(tmp_path))
            await wait_for(cfg.serial_log, "zm-boot 3", within=3 * BOOT_WITHIN)
            # Two resets later the same daemons serve the root (they end with QEMU).
            assert sorted(p.pid for p in _virtiofsd_refs(tmp_path)) == virtiofsd_before
            ended = await guest_ended(vm)
            await asyncio.wait_for(follower, 10)
            log = serial_text(cfg.serial_log)
            assert [line for line in log.splitlines() if line.startswith("zm-boot")] == [
                "zm-boot 1",
                "zm-boot 2",
                "zm-boot 3",
            ]
            assert "Kernel panic" in log and "Rebooting in 1 seconds" in log
            # One or more RESET per reboot (under TCG the kernel's keyboard-controller
            # reset loop can queue several before QEMU acts), all before the power-off.
            first_shutdown = seen.index(GuestEvent.SHUTDOWN)
            assert seen[:first_shutdown].count(GuestEvent.REBOOT) >= 2, seen
            assert GuestEvent.REBOOT not in seen[first_shutdown:], seen
            assert ended.exit is GuestExit.POWEROFF, ended

    asyncio.run(scenario())


def _virtiofsd_refs(tmp: Path) -> list[ProcessRef]:
    """The test's virtiofsd processes still running (their socket is on the cmdline)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ref = ProcessRef.of(int(entry.name), str(tmp / "run"))
            if ref.start_time and ref.alive() and "virtiofsd" in " ".join(cmdline(ref.pid)):
                found.append(ref)
    return found


# The flist's own initrd for the VM-mode test, packed from the same busybox + modules as
# ours: load modules, mount the virtio-fs root, hand over to init= with the kernel's args.
VM_MODE_INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r m; do insmod /lib/modules/$m 2>/dev/null; done </lib/modules/load.order
init=/sbin/init
for a in $(cat /proc/cmdline); do case $a in init=*) init=${a#init=} ;; esac; done
mount -t virtiofs vroot /new_root || { echo "flist-initrd: no root"; poweroff -f; }
echo "flist-initrd: switching to $init"
umount /proc
mount --move /dev /new_root/dev
exec switch_root /new_root "$init" "$@"
"""


@pytest.mark.parametrize("entrypoint", ["", "/sbin/init"])
def test_no_entrypoint_hands_pid_1_to_the_roots_init_over_the_c_virtiofsd(
    tmp_path: Path, agent_guest_dir: Path, entrypoint: str
) -> None:
    """Without an entrypoint, or with exactly /sbin/init, the root's /sbin/init becomes
    PID 1 (an init system must), with the spec's env. Served by the fallback daemon, QEMU
    7.2's deprecated C virtiofsd, with its flags."""
    c_daemon = Virtiofsd(QEMU_VIRTIOFSD, Flavor.QEMU)
    root = guest_busybox_root(tmp_path / "root")
    (root / "sbin").mkdir()
    init = root / "sbin/init"
    init.write_text('#!/bin/sh\necho "sbin-init pid=$$ greeting=$GREETING"; sleep 1; poweroff -f\n')
    init.chmod(0o755)
    seed = SeedConfig(instance_id="c", hostname="c", env={"GREETING": "hi"}, entrypoint=entrypoint)

    async def scenario() -> None:
        async with container_vm(
            tmp_path, root, agent_guest_dir, seed, daemon=c_daemon, nonce=new_nonce()
        ) as (vm, cfg):
            await wait_for(cfg.serial_log, "sbin-init pid=1 greeting=hi")
            assert (await guest_ended(vm)).exit is GuestExit.POWEROFF
            assert "zm-init: exit" not in serial_text(cfg.serial_log)  # no entrypoint to report

    asyncio.run(scenario())
