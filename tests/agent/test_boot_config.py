"""VMConfig validation, boot-mode detection, kernel command lines, QEMU and virtiofsd argv."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.agent.config import parse_config
from controller.agent.errors import InvalidSpec
from controller.agent.guest.virtiofs import (
    QEMU_VIRTIOFSD,
    Flavor,
    Virtiofsd,
    VirtiofsError,
    find_virtiofsd,
    start_virtiofsd,
)
from controller.agent.guest.vmconfig import (
    BootMode,
    Disk,
    FsShare,
    detect_boot,
    kernel_cmdline,
    resolve_in_root,
)
from controller.agent.hypervisor import (
    CloudHypervisor,
    ExitStatus,
    GuestExit,
    HypervisorError,
    Qemu,
    select_hypervisor,
)
from controller.agent.hypervisor.qemu import classify_qemu_exit
from tests.agent.test_cloud_hypervisor import make_config

BASE = "rw console=ttyS0 reboot=k panic=1 root=vroot rootfstype=virtiofs rootdelay=30"


def test_container_cmdline_has_no_init_but_the_boot_nonce() -> None:
    assert kernel_cmdline(BootMode.CONTAINER, "/bin/app --x") == BASE
    nonce = "0123456789abcdef0123456789abcdef"
    with_nonce = kernel_cmdline(BootMode.CONTAINER, "/bin/app", nonce=nonce)
    assert with_nonce == f"{BASE} zmachine.nonce={nonce}"
    # VM mode boots the flist's own init, which prints no exit marker.
    assert kernel_cmdline(BootMode.VM, "", nonce=nonce) == BASE


def test_vm_entrypoint_longer_than_the_kernel_command_line_is_refused() -> None:
    fits = "/bin/sh -c " + "x" * (2047 - len(BASE) - len(" init=/bin/sh -- -c "))
    assert len(kernel_cmdline(BootMode.VM, fits)) == 2047
    with pytest.raises(InvalidSpec, match=r"spec\.entrypoint: .* over the kernel's 2047"):
        kernel_cmdline(BootMode.VM, fits + "x")
    # Container mode carries it in the seed: no limit there.
    assert kernel_cmdline(BootMode.CONTAINER, fits * 3) == BASE


def test_vm_cmdline_passes_entrypoint_as_init_and_args_after_dashes() -> None:
    assert kernel_cmdline(BootMode.VM, "") == BASE
    assert kernel_cmdline(BootMode.VM, "/sbin/init") == BASE + " init=/sbin/init"
    assert (
        kernel_cmdline(BootMode.VM, "/bin/sh -c 'echo hi there' -x")
        == BASE + ' init=/bin/sh -- -c "echo hi there" -x'
    )
    with pytest.raises(InvalidSpec, match="kernel command line"):
        kernel_cmdline(BootMode.VM, "/bin/echo 'say \"x\"'")
    with pytest.raises(InvalidSpec, match="not a valid command"):
        kernel_cmdline(BootMode.VM, "/bin/echo 'open")


def make_root(tmp: Path) -> tuple[Path, Path]:
    root, guest = tmp / "root", tmp / "guest"
    (root / "boot").mkdir(parents=True)
    guest.mkdir()
    (guest / "vmlinuz").write_bytes(b"ours")
    (guest / "initramfs.img").write_bytes(b"ours")
    return root, guest


def test_detect_boot_container_mode_uses_our_assets(tmp_path: Path) -> None:
    root, guest = make_root(tmp_path)
    assets = detect_boot(root, guest)
    assert (assets.mode, assets.kernel, assets.initrd) == (
        BootMode.CONTAINER,
        guest / "vmlinuz",
        guest / "initramfs.img",
    )
    with pytest.raises(InvalidSpec, match=r"build-guest-kernel\.sh"):
        detect_boot(root, tmp_path / "missing")


def test_detect_boot_vm_mode_resolves_links_inside_the_root(tmp_path: Path) -> None:
    root, guest = make_root(tmp_path)
    (root / "boot/vmlinuz-6.1").write_bytes(b"theirs")
    (root / "boot/vmlinuz").symlink_to("/boot/vmlinuz-6.1")  # absolute, inside the root
    assets = detect_boot(root, guest)
    assert (assets.mode, assets.kernel, assets.initrd) == (
        BootMode.VM,
        root / "boot/vmlinuz-6.1",
        None,
    )
    (root / "boot/initrd.img").write_bytes(b"theirs")
    assert detect_boot(root, guest).initrd == root / "boot/initrd.img"


def test_links_cannot_escape_the_root(tmp_path: Path) -> None:
    root, guest = make_root(tmp_path)
    (tmp_path / "host-secret").write_text("x")
    (root / "boot/vmlinuz").symlink_to("../../../host-secret")
    assert resolve_in_root(root, "/boot/vmlinuz") is None  # ".." stops at the root
    assert detect_boot(root, guest).mode is BootMode.CONTAINER
    (root / "loop").symlink_to("/loop")
    with pytest.raises(InvalidSpec, match="too many symlinks"):
        resolve_in_root(root, "/loop/x")


def test_vmlinuz_directory_is_refused(tmp_path: Path) -> None:
    root, guest = make_root(tmp_path)
    (root / "boot/vmlinuz").mkdir()
    with pytest.raises(InvalidSpec, match="/boot/vmlinuz is a directory"):
        detect_boot(root, guest)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cpus": 0}, "cpus"),
        ({"memory_mib": 16}, "memory_mib"),
        ({"vm_id": "a/b"}, "vm_id"),
        ({"initrd": Path("/nonexistent/initrd")}, "initrd"),
        ({"shares": [FsShare("x" * 37, Path("s"), Path("d"))]}, "1-36 bytes"),
        ({"shares": [FsShare("a", Path("s"), Path("d"))] * 2}, "unique"),
        ({"disks": [Disk(Path("/a,b"))]}, "must not contain ','"),
        ({"serial_log": Path("/tmp/x,y.log")}, "must not contain ','"),
        ({"api_socket": Path("/" + "s" * 110)}, "longer than 107 bytes"),
    ],
)
def test_validate_names_the_field(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        make_config(tmp_path, **overrides).validate()


def test_qemu_command_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, netns="zmns", serial_pty=True)
    argv = Qemu(accel="tcg").argv(cfg)
    assert argv[:4] == ["nsenter", "--net=/run/netns/zmns", "--", "qemu-system-x86_64"]
    joined = " ".join(argv)
    for part in (
        "-machine q35,memory-backend=ram0 -accel tcg,tb-size=64",
        "-cpu max -smp 2 -m 512M",
        "-object memory-backend-memfd,id=ram0,size=512M,share=on",
        f"-kernel {tmp_path / 'vmlinuz'} -initrd {tmp_path / 'initramfs.img'}",
        f"-chardev socket,id=fs1,path={tmp_path / 'fs1.sock'}",
        "-device vhost-user-fs-pci,chardev=fs1,tag=data",
        f"-drive file={tmp_path / 'vol.img'},if=none,id=disk0,format=raw,readonly=off",
        f"-drive file={tmp_path / 'seed.img'},if=none,id=disk1,format=raw,readonly=on",
        "-device virtio-blk-pci,drive=disk1",
        "-netdev tap,id=net0,ifname=zm0123456789n0,script=no,downscript=no",
        "-device virtio-net-pci,netdev=net0,mac=02:11:22:33:44:55",
        f"-qmp unix:{tmp_path / 'api.sock'},server=on,wait=off",
        f"-qmp unix:{tmp_path / 'api-ev.sock'},server=on,wait=off",  # the event follower's
    ):
        assert part in joined
    # The agent reads the PTY and writes the log (no QEMU logfile competing with it).
    assert argv[argv.index("-serial") - 1] == "pty,id=serial0"
    assert "-no-shutdown" in argv  # a guest power-off keeps QEMU up (GuestExit)
    assert argv[argv.index("-append") + 1] == cfg.cmdline
    serial_file = make_config(tmp_path, initrd=None)
    argv = Qemu(accel="tcg").command(serial_file)
    assert "-initrd" not in argv
    assert f"null,id=serial0,logfile={tmp_path / 'serial.log'},logappend=on" in argv


def test_qemu_disk_boot_has_no_kernel_and_boots_the_first_disk(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, kernel=None, initrd=None, cmdline="")
    argv = Qemu(accel="tcg").command(cfg)
    assert not {"-kernel", "-initrd", "-append", "-bios"} & set(argv)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    blk = [d for d in devices if d.startswith("virtio-blk-pci")]
    assert blk == ["virtio-blk-pci,drive=disk0,bootindex=0", "virtio-blk-pci,drive=disk1"]
    # A direct kernel boot sets no boot index (the kernel is what boots).
    assert "bootindex" not in " ".join(Qemu(accel="tcg").command(make_config(tmp_path)))


def test_disk_boot_config_needs_a_disk_and_no_initrd(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="disk boot needs a boot disk"):
        make_config(tmp_path, kernel=None, initrd=None, disks=[]).validate()
    with pytest.raises(InvalidSpec, match="disk boot needs a boot disk and no initrd"):
        make_config(tmp_path, kernel=None).validate()


def test_firmware_flag_with_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config(["--insecure-dev", "--listen", "127.0.0.1:1"]).firmware is None
    monkeypatch.setenv("ZMACHINE_AGENT_FIRMWARE", "/opt/fw/hypervisor-fw")
    config = parse_config(["--insecure-dev", "--listen", "127.0.0.1:1"])
    assert config.firmware == Path("/opt/fw/hypervisor-fw")
    flag = ["--insecure-dev", "--listen", "127.0.0.1:1", "--firmware", "/fw2"]
    assert parse_config(flag).firmware == Path("/fw2")


def test_accel_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZM_ACCEL", "tcg")
    assert Qemu().acceleration() == "tcg"
    assert Qemu(accel="kvm").acceleration() == "kvm"  # an explicit argument wins
    monkeypatch.delenv("ZM_ACCEL")
    assert Qemu().acceleration() == "tcg"  # auto without probe assets
    with pytest.raises(HypervisorError, match="accel 'fast'"):
        Qemu(accel="fast")


def test_select_hypervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CloudHypervisor, "available", staticmethod(lambda: False))
    assert select_hypervisor().name == "qemu"
    with pytest.raises(HypervisorError, match="not on PATH"):
        select_hypervisor("cloud-hypervisor")
    monkeypatch.setattr(CloudHypervisor, "available", staticmethod(lambda: True))
    assert select_hypervisor().name == "qemu"  # on PATH, but no probe guest: not proven
    ch = select_hypervisor("cloud-hypervisor", firmware=Path("/fw"))
    assert isinstance(ch, CloudHypervisor) and ch.firmware == Path("/fw")
    assert select_hypervisor(accel="tcg").name == "qemu"  # CH has no TCG
    assert select_hypervisor("qemu").name == "qemu"
    with pytest.raises(HypervisorError, match="unknown hypervisor"):
        select_hypervisor("firecracker")


def test_versions_are_reported() -> None:
    version = Qemu().version()
    assert version[0].isdigit() and version.count(".") == 2


def test_virtiofsd_flags_per_flavor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = FsShare("vroot", tmp_path / "fs.sock", tmp_path / "root")
    rust = Virtiofsd(Path("/usr/bin/virtiofsd"), Flavor.RUST).argv(share)
    assert rust == [
        "/usr/bin/virtiofsd",
        "--socket-path", str(tmp_path / "fs.sock"),
        "--shared-dir", str(tmp_path / "root"),
        "--xattr", "--cache", "auto",
    ]  # fmt: skip
    qemu = Virtiofsd(QEMU_VIRTIOFSD, Flavor.QEMU).argv(share)
    assert qemu == [
        str(QEMU_VIRTIOFSD),
        f"--socket-path={tmp_path / 'fs.sock'}",
        "-o", f"source={tmp_path / 'root'}",
        "-o", "cache=auto",
        "-o", "xattr",
    ]  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))  # no Rust virtiofsd on PATH
    assert find_virtiofsd().flavor is Flavor.QEMU


def test_virtiofsd_refuses_a_missing_directory(tmp_path: Path) -> None:
    share = FsShare("data", tmp_path / "fs.sock", tmp_path / "missing")
    with pytest.raises(VirtiofsError, match=r"share 'data'.*is not a directory"):
        asyncio.run(start_virtiofsd(share, tmp_path / "log"))


def test_missing_binaries_are_typed_errors(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, shares=[FsShare("vroot", tmp_path / "fs.sock", tmp_path)])
    with pytest.raises(HypervisorError, match=r"cannot run /nonexistent/qemu"):
        asyncio.run(Qemu(binary="/nonexistent/qemu", accel="tcg").start(cfg))
    daemon = Virtiofsd(Path("/nonexistent/virtiofsd"), Flavor.RUST)
    with pytest.raises(VirtiofsError, match=r"cannot run /nonexistent/virtiofsd"):
        asyncio.run(start_virtiofsd(cfg.shares[0], tmp_path / "log", daemon=daemon))


@pytest.mark.parametrize(
    ("events", "status", "expected"),
    [
        # QEMU exits 0 on SIGTERM and quit: the recorded SHUTDOWN reason tells them apart.
        ([("SHUTDOWN", {"guest": False, "reason": "host-signal"})], 0, GuestExit.HOST_STOP),
        ([("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})], None, GuestExit.HOST_STOP),
        ([("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})], None, GuestExit.POWEROFF),
        ([("RESET", {"guest": True}), ("GUEST_PANICKED", {})], 0, GuestExit.PANIC),
        ([("RESET", {"guest": True, "reason": "guest-reset"})], 1, GuestExit.VMM_ERROR),
        ([], None, GuestExit.VMM_ERROR),  # adopted and gone without a word
        ([], 0, GuestExit.HOST_STOP),
    ],
)
def test_qemu_exit_classification(
    events: list[tuple[str, dict[str, object]]], status: int | None, expected: GuestExit
) -> None:
    recorded = [{"event": name, "data": data} for name, data in events]
    exit, detail = classify_qemu_exit(recorded, None if status is None else ExitStatus(status))
    assert exit is expected, detail
