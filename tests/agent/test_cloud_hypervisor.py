"""cloud-hypervisor driver: its command line, its REST API requests, exit classification.

The API tests talk to ``fake_ch_api``: a fake, in-test HTTP/1.1 server on a UNIX socket
that records every request and answers as cloud-hypervisor v53 does (200 with an empty
body for vmm.shutdown, 204 without Content-Length for the other PUTs). The VMM process
itself is stood in for by a real process that exits 0 on SIGTERM, as CH does. The real
binary's tests are in test_cloud_hypervisor_real.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.agent.errors import FailedPrecondition
from controller.agent.guest.vmconfig import Disk, FsShare, Nic, VMConfig
from controller.agent.hypervisor import (
    CloudHypervisor,
    ExitStatus,
    GuestExit,
    HypervisorError,
    select_hypervisor,
)
from controller.agent.hypervisor.base import PROBE_MARKER
from controller.agent.hypervisor.ch_api import CloudHypervisorAPI, CloudHypervisorAPIError
from controller.agent.hypervisor.cloud_hypervisor import (
    CloudHypervisorVM,
    ch_runs_guests,
    classify_ch_exit,
    event_names,
    read_events,
)
from controller.agent.runtime.procs import ProcessRef, spawn_detached, terminate

pytestmark = pytest.mark.timeout(60)

# Documented VmConfig fields per section (cloud-hypervisor.yaml), for the keys we use.
DOC_FIELDS = {
    "payload": {"kernel", "initramfs", "cmdline", "firmware", "igvm", "host_data"},
    "cpus": {"boot_vcpus", "max_vcpus", "topology", "kvm_hyperv", "max_phys_bits", "affinity"},
    "memory": {"size", "shared", "hugepages", "hugepage_size", "hotplug_size", "prefault"},
    "fs": {"tag", "socket", "num_queues", "queue_size", "id", "pci_segment"},
    "disks": {"path", "readonly", "direct", "id", "num_queues", "queue_size", "image_type"},
    "net": {"tap", "ip", "mask", "mac", "host_mac", "mtu", "id", "num_queues", "queue_size"},
    "serial": {"mode", "file", "socket"},
    "console": {"mode", "file", "iommu"},
}
# CLI flag -> (VmConfig section, is a list of devices)
FLAG_SECTIONS = {
    "--cpus": ("cpus", False),
    "--memory": ("memory", False),
    "--fs": ("fs", True),
    "--disk": ("disks", True),
    "--net": ("net", True),
}
# CLI option names that the API spells differently.
CLI_TO_API = {"boot": "boot_vcpus"}


def make_config(tmp: Path, **overrides: Any) -> VMConfig:
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"k")
    initrd = tmp / "initramfs.img"
    initrd.write_bytes(b"i")
    values: dict[str, Any] = {
        "vm_id": "default-web-1",
        "cpus": 2,
        "memory_mib": 512,
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": "rw console=ttyS0 reboot=k panic=1 root=vroot rootfstype=virtiofs rootdelay=30",
        "shares": [
            FsShare("vroot", tmp / "fs0.sock", tmp / "rootfs"),
            FsShare("data", tmp / "fs1.sock", tmp / "data"),
        ],
        "disks": [Disk(tmp / "vol.img"), Disk(tmp / "seed.img", readonly=True)],
        "nics": [Nic("zm0123456789n0", "02:11:22:33:44:55")],
        "serial_log": tmp / "serial.log",
        "api_socket": tmp / "api.sock",
        "state_dir": tmp / "state",
    }
    values.update(overrides)
    return VMConfig(**values)


# Process options, not VmConfig sections.
PROCESS_FLAGS = ("--api-socket", "--event-monitor", "--log-file", "--no-shutdown")


def vmconfig_from_cli(argv: list[str]) -> dict[str, Any]:
    """The VmConfig JSON that cloud-hypervisor builds from these flags (documented mapping)."""
    config: dict[str, Any] = {"payload": {}}
    flag = ""
    for arg in argv[1:]:
        if arg.startswith("--"):
            flag = arg
            if flag == "--no-shutdown":
                config["_no_shutdown"] = True
            continue
        if flag in ("--kernel", "--initramfs", "--cmdline", "--firmware"):
            config["payload"][flag[2:]] = arg
        elif flag in PROCESS_FLAGS:
            config["_" + flag[2:]] = arg
        elif flag in ("--serial", "--console"):
            mode, _, path = arg.partition("=")
            section = {"mode": mode.capitalize()}
            if path:
                section["file"] = path
            config[flag[2:]] = section
        else:
            name, is_list = FLAG_SECTIONS[flag]
            opts = {}
            for item in arg.split(","):
                key, _, value = item.partition("=")
                opts[CLI_TO_API.get(key, key)] = value
            if is_list:
                config.setdefault(name, []).append(opts)
            else:
                config[name] = opts
    return config


def test_command_line_uses_documented_flags_and_vmconfig_fields(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    argv = CloudHypervisor().command(cfg)
    assert argv == [
        "cloud-hypervisor",
        "--api-socket", str(tmp_path / "api.sock"),
        "--kernel", str(tmp_path / "vmlinuz"),
        "--initramfs", str(tmp_path / "initramfs.img"),
        "--cmdline", cfg.cmdline,
        "--event-monitor", f"path={tmp_path / 'state' / 'vmm-events.json'}",
        "--no-shutdown",
        "--log-file", str(tmp_path / "state" / "vmm-run.log"),
        "--cpus", "boot=2",
        "--memory", "size=512M,shared=on",
        "--fs",
        f"tag=vroot,socket={tmp_path / 'fs0.sock'},id=fs0",
        f"tag=data,socket={tmp_path / 'fs1.sock'},id=fs1",
        "--disk",
        f"path={tmp_path / 'vol.img'},readonly=off,image_type=raw,id=disk0",
        f"path={tmp_path / 'seed.img'},readonly=on,image_type=raw,id=disk1",
        "--net", "tap=zm0123456789n0,mac=02:11:22:33:44:55,id=net0",
        "--serial", f"file={tmp_path / 'serial.log'}",
        "--console", "off",
    ]  # fmt: skip
    config = vmconfig_from_cli(argv)
    for section, value in config.items():
        if section.startswith("_"):
            continue
        for entry in value if isinstance(value, list) else [value]:
            unknown = set(entry) - DOC_FIELDS[section]
            assert not unknown, f"{section}: {unknown} are not documented VmConfig fields"
    assert config["memory"] == {"size": "512M", "shared": "on"}  # vhost-user needs shared
    assert config["console"] == {"mode": "Off"}  # the default Tty would grab our stdout
    assert [fs["tag"] for fs in config["fs"]] == ["vroot", "data"]
    # Autodetection would refuse guest writes to sector 0 of a raw image.
    assert [d["image_type"] for d in config["disks"]] == ["raw", "raw"]
    assert config["_no_shutdown"]  # a guest power-off must not end the VMM (GuestExit)


def test_command_line_variants(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, initrd=None, shares=[], disks=[], nics=[], serial_pty=True)
    argv = CloudHypervisor().command(cfg)
    assert "--initramfs" not in argv
    assert not {"--fs", "--disk", "--net"} & set(argv)
    assert argv[argv.index("--serial") + 1] == "pty"
    netns = make_config(tmp_path, netns="zmns1")
    assert CloudHypervisor().argv(netns)[:4] == [
        "nsenter",
        "--net=/run/netns/zmns1",
        "--",
        "cloud-hypervisor",
    ]


def test_image_mode_boots_the_firmware_from_the_boot_disk(tmp_path: Path) -> None:
    firmware = tmp_path / "hypervisor-fw"
    firmware.write_bytes(b"fw")
    cfg = make_config(tmp_path, kernel=None, initrd=None, cmdline="", shares=[])
    argv = CloudHypervisor(firmware=firmware).command(cfg)
    api = ["--api-socket", str(cfg.api_socket)]
    assert argv[:5] == ["cloud-hypervisor", *api, "--firmware", str(firmware)]
    assert not {"--kernel", "--initramfs", "--cmdline", "--fs"} & set(argv)
    config = vmconfig_from_cli(argv)
    assert config["payload"] == {"firmware": str(firmware)}
    assert set(config["payload"]) <= DOC_FIELDS["payload"]
    # The firmware boots the first disk: the boot disk, with the seed still last.
    assert [d["path"] for d in config["disks"]] == [
        str(tmp_path / "vol.img"),
        str(tmp_path / "seed.img"),
    ]


def test_image_mode_without_firmware_is_a_failed_precondition(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, kernel=None, initrd=None, cmdline="")
    with pytest.raises(
        FailedPrecondition, match="needs a firmware: start the agent with --firmware"
    ):
        CloudHypervisor().require_disk_boot()
    with pytest.raises(FailedPrecondition, match="--firmware"):
        CloudHypervisor().command(cfg)
    with pytest.raises(FailedPrecondition, match="is not a file"):
        CloudHypervisor(firmware=tmp_path / "missing-fw").require_disk_boot()
    assert FailedPrecondition.code == grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class FakeCH:
    """State behind fake_ch_api: the requests seen and how the fake VM behaves."""

    socket: Path
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    state: str = "Running"
    on_put: dict[str, Callable[[], None]] = field(default_factory=dict)
    vm_config: dict[str, Any] = field(default_factory=dict)

    def respond(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        endpoint = path.removeprefix("/api/v1/")
        gets = {"vmm.ping", "vm.info", "vm.counters"}
        puts = {"vm.pause", "vm.resume", "vm.power-button", "vm.shutdown", "vmm.shutdown"}
        if endpoint not in gets | puts:
            return 404, None
        if (method == "GET") != (endpoint in gets):
            return 400, None  # the documented answer to a wrong verb
        if endpoint == "vmm.ping":
            return 200, {"build_version": "v53.0-fake", "version": "53.0", "pid": 1}
        if endpoint == "vm.info":
            return 200, {"config": self.vm_config, "state": self.state}
        if endpoint == "vm.counters":
            return 200, {"net0": {"rx_bytes": 10, "tx_bytes": 20}, "disk0": {"read_bytes": 5}}
        if endpoint in ("vm.pause", "vm.shutdown") and self.state not in ("Running", "Paused"):
            return 500, ["VM is not running"]
        if endpoint == "vm.pause":
            self.state = "Paused"
        elif endpoint == "vm.resume":
            self.state = "Running"
        elif endpoint == "vm.shutdown":
            self.state = "Created"  # what vm.info says once the VM object is gone
        self.on_put.get(endpoint, lambda: None)()
        return (200 if endpoint == "vmm.shutdown" else 204), None


@asynccontextmanager
async def fake_ch_api(socket: Path) -> AsyncIterator[FakeCH]:
    """A fake cloud-hypervisor API server (see the module docstring for why)."""
    fake = FakeCH(socket)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        method, path, _ = head[0].split(" ")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        status, answer = fake.respond(method, path, json.loads(raw) if raw else None)
        lines = [f"HTTP/1.1 {status} X", "Server: Cloud Hypervisor API"]
        payload = b"" if answer is None else json.dumps(answer).encode()
        if status != 204:  # micro_http sends no Content-Length with a 204
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(socket))
    try:
        yield fake
    finally:
        server.close()
        await server.wait_closed()


def test_api_requests_match_the_documented_api(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path, serial_pty=True)
        async with fake_ch_api(cfg.api_socket) as fake:
            fake.vm_config = {"serial": {"mode": "Pty", "file": "/dev/pts/7"}}
            vm = CloudHypervisor().attach(cfg, ProcessRef(0, 0, "unused"))
            assert await vm.ready()
            await vm.pause()
            assert (await vm.state()) == "paused"
            await vm.resume()
            assert await vm.console_pty() == "/dev/pts/7"
            assert await vm.counters() == {
                "net0": {"rx_bytes": 10, "tx_bytes": 20},
                "disk0": {"read_bytes": 5},
            }
            await vm.power_button()
            await vm.hard_stop()
        assert fake.requests == [
            ("GET", "/api/v1/vm.info", None),
            ("PUT", "/api/v1/vm.pause", None),
            ("GET", "/api/v1/vm.info", None),
            ("PUT", "/api/v1/vm.resume", None),
            ("GET", "/api/v1/vm.info", None),
            ("GET", "/api/v1/vm.counters", None),
            ("PUT", "/api/v1/vm.power-button", None),
            ("PUT", "/api/v1/vm.shutdown", None),
            ("PUT", "/api/v1/vmm.shutdown", None),
        ]

    asyncio.run(scenario())


def test_ready_means_the_vm_runs_not_just_that_the_vmm_answers(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
        async with fake_ch_api(cfg.api_socket) as fake:
            vm = CloudHypervisor().attach(cfg, ProcessRef(0, 0, "unused"))
            fake.state = "Created"  # vmm.ping answers, but no VM is running
            assert not await vm.ready()
            fake.state = "Running"
            assert await vm.ready()

    asyncio.run(scenario())


def test_hard_stop_asks_the_vmm_to_exit_even_when_vm_shutdown_fails(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
        async with fake_ch_api(cfg.api_socket) as fake:
            fake.state = "Created"  # e.g. the guest already shut the VM down
            vm = CloudHypervisor().attach(cfg, ProcessRef(0, 0, "unused"))
            with pytest.raises(CloudHypervisorAPIError, match=r"vm\.shutdown -> HTTP 500"):
                await vm.hard_stop()
        assert [p for _, p, _ in fake.requests] == ["/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"]

    asyncio.run(scenario())


def test_api_errors_carry_status_and_body(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fake_ch_api(tmp_path / "api.sock") as fake:
            fake.state = "Shutdown"
            api = CloudHypervisorAPI(tmp_path / "api.sock")
            with pytest.raises(CloudHypervisorAPIError, match=r"vm\.pause -> HTTP 500") as err:
                await api.pause()
            assert err.value.status == 500 and "VM is not running" in str(err.value)
            with pytest.raises(CloudHypervisorAPIError, match="HTTP 400"):
                await api.request("GET", "vm.pause")
            with pytest.raises(CloudHypervisorAPIError, match="HTTP 404"):
                await api.request("PUT", "vm.explode", {"now": True})
            assert fake.requests[-1] == ("PUT", "/api/v1/vm.explode", {"now": True})
            fake.state = "Running"
            assert await api.request("PUT", "vmm.shutdown") is None  # 200, empty body
        with pytest.raises(HypervisorError, match=r"vmm\.ping failed"):
            await CloudHypervisorAPI(tmp_path / "gone.sock").ping()

    asyncio.run(scenario())


def stand_in_vmm(tmp: Path) -> ProcessRef:
    """A real process playing the VMM: exits 0 on SIGUSR1 (a guest power-off without
    --no-shutdown) and on SIGTERM, as cloud-hypervisor does."""
    ready = tmp / "stand-in.ready"
    script = f"trap 'exit 0' USR1 TERM; : >{ready}; while :; do sleep 0.1; done"
    ref = spawn_detached(["sh", "-c", script, "stand-in-ch"], tmp / "vmm.log", "stand-in-ch")
    deadline = time.monotonic() + 10
    while not ready.exists():  # the trap is in place only from here on
        assert time.monotonic() < deadline, "stand-in VMM did not start"
        time.sleep(0.01)
    return ref


def test_stop_ends_at_the_power_button_when_the_guest_powers_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
        cfg.state_dir.mkdir()
        ref = stand_in_vmm(tmp_path)
        async with fake_ch_api(cfg.api_socket) as fake:
            fake.on_put["vm.power-button"] = lambda: os.kill(ref.pid, signal.SIGUSR1)
            vm = CloudHypervisorVM(cfg, ref)
            status = await vm.stop(grace=10)
        assert [p for _, p, _ in fake.requests] == ["/api/v1/vm.power-button"]
        assert status == ExitStatus(0), status
        ended = await vm.guest_exit()
        assert ended is not None and ended.exit is GuestExit.STOPPED_BY_AGENT

    asyncio.run(scenario())


def test_stop_escalates_to_shutdown_then_sigterm(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
        cfg.state_dir.mkdir()
        ref = stand_in_vmm(tmp_path)
        try:
            async with fake_ch_api(cfg.api_socket) as fake:
                vm = CloudHypervisorVM(cfg, ref)
                status = await vm.stop(grace=0.5, hard_grace=0.5, term_grace=5)
            assert [p for _, p, _ in fake.requests] == [
                "/api/v1/vm.power-button",
                "/api/v1/vm.shutdown",
                "/api/v1/vmm.shutdown",
            ]
            assert not vm.alive()
            # Exit status 0 after SIGTERM, like CH: the status alone says nothing.
            assert status == ExitStatus(0) and status.describe() == "exited with status 0"
            ended = await vm.guest_exit()
            assert ended is not None and ended.exit is GuestExit.STOPPED_BY_AGENT
        finally:
            await terminate(ref, grace=1)

    asyncio.run(scenario())


def write_ch_events(path: Path, *names: str) -> None:
    """An event-monitor file as cloud-hypervisor writes it: pretty JSON, blank lines."""
    with open(path, "w") as f:
        for i, name in enumerate(names):
            source, event = name.split("/")
            record = {
                "timestamp": {"secs": i, "nanos": 0},
                "source": source,
                "event": event,
                "properties": None,
            }
            f.write(json.dumps(record, indent=2) + "\n\n")


START = ("vmm/starting", "vm/booting", "vm/booted")
ORDERLY_EXIT = ("vm/shutdown", "vm/deleted", "vmm/shutdown")


@pytest.mark.parametrize(
    ("events", "run_log", "status", "expected"),
    [
        # Exit status 0 in all of these but the last two: only the events tell them apart.
        ([*START, *ORDERLY_EXIT], "", 0, GuestExit.HOST_STOP),  # SIGTERM or vmm.shutdown
        (
            [*START, *ORDERLY_EXIT],
            "cloud-hypervisor: 3.1s: <vcpu0> ERROR:vmm/src/cpu.rs:1440 -- vCPU error",
            0,
            GuestExit.VMM_ERROR,
        ),
        ([*START, "vm/rebooting"], "", 1, GuestExit.REBOOT),  # virtiofsd gone at reboot
        ([*START, "vm/rebooting", "vm/rebooted", *ORDERLY_EXIT], "", 0, GuestExit.HOST_STOP),
        ([*START, "guest/panic", *ORDERLY_EXIT], "", 0, GuestExit.PANIC),
        ([*START], "", 1, GuestExit.VMM_ERROR),
        ([*START], "", None, GuestExit.VMM_ERROR),  # adopted, vanished (SIGKILL?)
    ],
)
def test_ch_exit_classification(
    tmp_path: Path,
    events: list[str],
    run_log: str,
    status: int | None,
    expected: GuestExit,
) -> None:
    write_ch_events(tmp_path / "events.json", *events)
    parsed = read_events(tmp_path / "events.json")
    assert event_names(parsed) == events
    exit, detail = classify_ch_exit(parsed, run_log, None if status is None else ExitStatus(status))
    assert exit is expected, detail
    assert not exit.clean


def test_a_powered_off_guest_leaves_the_vmm_up_and_is_classified_then_ended(
    tmp_path: Path,
) -> None:
    """--no-shutdown: the guest's power-off ends in vm/shutdown with CH still running;
    guest_exit records POWEROFF (before ending the VMM, so a restart still knows)."""

    async def scenario() -> None:
        cfg = make_config(tmp_path)
        cfg.state_dir.mkdir()
        ref = stand_in_vmm(tmp_path)
        try:
            vm = CloudHypervisorVM(cfg, ref)
            # vm/shutdown is also the first of SIGTERM's events; a VMM that does not
            # answer is on its way out, not powered off: undecided until it is gone.
            write_ch_events(cfg.events_file, *START, "vm/shutdown")
            assert await vm.guest_exit() is None
            assert not cfg.exit_file.exists()
            async with fake_ch_api(cfg.api_socket) as fake:
                write_ch_events(cfg.events_file, *START)
                assert await vm.guest_exit() is None  # running
                write_ch_events(cfg.events_file, *START, "vm/shutdown")
                fake.state = "Created"
                fake.on_put["vmm.shutdown"] = lambda: os.kill(ref.pid, signal.SIGTERM)
                ended = await vm.guest_exit()
                assert ended is not None and ended.exit is GuestExit.POWEROFF
                assert ended.exit.clean
                assert await vm.wait(5), "the powered-off VMM was not ended"
                assert [p for _, p, _ in fake.requests][-2:] == [
                    "/api/v1/vm.shutdown",
                    "/api/v1/vmm.shutdown",
                ]
            # Another agent process (no child status) reads the same record.
            again = await CloudHypervisorVM(cfg, ref).guest_exit()
            assert again is not None and again.exit is GuestExit.POWEROFF
        finally:
            await terminate(ref, grace=1)

    asyncio.run(scenario())


def test_a_stale_lock_is_reused_and_a_held_one_refuses_the_start(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, serial_pty=True)
    lock = cfg.api_socket.with_name(cfg.api_socket.name + ".lock")
    lock.write_bytes(b"")
    cfg.api_socket.write_bytes(b"")  # stands for a socket a crashed VMM left behind
    ch = CloudHypervisor()
    ch.clear_stale_socket(cfg)  # nobody holds the lock: the stale socket goes
    assert not cfg.api_socket.exists()
    assert lock.exists()  # the lock file is CH's, never ours to delete
    # A live VMM holds an OFD write lock on it, as cloud-hypervisor v53 does.
    holder = os.open(lock, os.O_RDWR)
    try:
        fcntl.fcntl(holder, fcntl.F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        cfg.api_socket.write_bytes(b"")  # its live socket
        with pytest.raises(HypervisorError, match=r"holds .*api\.sock\.lock.*second one"):
            ch.clear_stale_socket(cfg)
        assert cfg.api_socket.exists() and lock.exists()
        with pytest.raises(HypervisorError, match="second one"):
            asyncio.run(ch.start(cfg))
        assert cfg.api_socket.exists() and lock.exists()
    finally:
        os.close(holder)


def test_auto_picks_cloud_hypervisor_only_if_a_probe_guest_boots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``cloud-hypervisor`` on PATH (a script): one that boots (prints the
    probe marker to its --serial file and exits 0) and one that fails, as a guest under
    nested KVM does here."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: the probe is skipped and QEMU chosen without booting")
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "vmlinuz").write_bytes(b"k")
    (guest / "initramfs.img").write_bytes(b"i")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "cloud-hypervisor"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    booting = (
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --serial ] && f=${2#file=}; shift; done\n'
        f'echo "{PROBE_MARKER}" > "$f"\n'
    )
    for script, expected in ((booting, "cloud-hypervisor"), ("#!/bin/sh\nexit 1\n", "qemu")):
        stand_in.write_text(script)
        stand_in.chmod(0o755)
        ch_runs_guests.cache_clear()
        assert select_hypervisor("auto", "auto", guest).name == expected
    assert select_hypervisor("auto", "tcg", guest).name == "qemu"  # never probed
