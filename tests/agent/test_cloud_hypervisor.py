"""cloud-hypervisor driver: its command line and its REST API requests.

No cloud-hypervisor binary can be had on this machine (no Debian package, no way to
download a release), so the API tests talk to ``fake_ch_api``: a fake, in-test HTTP/1.1
server on a UNIX socket that records every request and answers as the documented API
does (cloud-hypervisor's openapi spec and docs/api.md, see
/work/shared/reference/cloud-hypervisor.md §2). The VMM process itself is stood in for by
a real process that the fake can make exit (as CH does when the guest powers off).
``test_real_cloud_hypervisor_lifecycle`` runs the real binary when it is on PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.agent.errors import FailedPrecondition
from controller.agent.hypervisor import CloudHypervisor, HypervisorError
from controller.agent.hypervisor.ch_api import CloudHypervisorAPI, CloudHypervisorAPIError
from controller.agent.hypervisor.cloud_hypervisor import CloudHypervisorVM
from controller.agent.procs import ProcessRef, spawn_detached, terminate
from controller.agent.vmconfig import Disk, FsShare, Nic, VMConfig

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


def vmconfig_from_cli(argv: list[str]) -> dict[str, Any]:
    """The VmConfig JSON that cloud-hypervisor builds from these flags (documented mapping)."""
    config: dict[str, Any] = {"payload": {}}
    flag = ""
    for arg in argv[1:]:
        if arg.startswith("--"):
            flag = arg
            continue
        if flag in ("--kernel", "--initramfs", "--cmdline", "--firmware"):
            config["payload"][flag[2:]] = arg
        elif flag == "--api-socket":
            config["_api_socket"] = arg
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
        "--cpus", "boot=2",
        "--memory", "size=512M,shared=on",
        "--fs",
        f"tag=vroot,socket={tmp_path / 'fs0.sock'},id=fs0",
        f"tag=data,socket={tmp_path / 'fs1.sock'},id=fs1",
        "--disk",
        f"path={tmp_path / 'vol.img'},readonly=off,id=disk0",
        f"path={tmp_path / 'seed.img'},readonly=on,id=disk1",
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
            return 200, {"build_version": "v39.0-fake", "version": "39.0", "pid": 1}
        if endpoint == "vm.info":
            return 200, {"config": self.vm_config, "state": self.state}
        if endpoint == "vm.counters":
            return 200, {"net0": {"rx_bytes": 10, "tx_bytes": 20}, "disk0": {"read_bytes": 5}}
        if endpoint == "vm.pause":
            if self.state != "Running":
                return 500, ["VM is not running"]
            self.state = "Paused"
        elif endpoint == "vm.resume":
            self.state = "Running"
        self.on_put.get(endpoint, lambda: None)()
        return 204, None


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
        payload = b"" if answer is None else json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nServer: Cloud Hypervisor API\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
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
            ("GET", "/api/v1/vmm.ping", None),
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
        with pytest.raises(HypervisorError, match=r"vmm\.ping failed"):
            await CloudHypervisorAPI(tmp_path / "gone.sock").ping()

    asyncio.run(scenario())


def stand_in_vmm(tmp: Path) -> ProcessRef:
    """A real process playing the VMM: exits 0 on SIGUSR1, ignores nothing else."""
    ready = tmp / "stand-in.ready"
    script = f"trap 'exit 0' USR1; : >{ready}; while :; do sleep 0.1; done"
    ref = spawn_detached(["sh", "-c", script, "stand-in-ch"], tmp / "vmm.log", "stand-in-ch")
    deadline = time.monotonic() + 10
    while not ready.exists():  # the trap is in place only from here on
        assert time.monotonic() < deadline, "stand-in VMM did not start"
        time.sleep(0.01)
    return ref


def test_stop_ends_at_the_power_button_when_the_guest_powers_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
        ref = stand_in_vmm(tmp_path)
        async with fake_ch_api(cfg.api_socket) as fake:
            # CH exits with status 0 when the guest powers off.
            fake.on_put["vm.power-button"] = lambda: os.kill(ref.pid, signal.SIGUSR1)
            status = await CloudHypervisorVM(cfg, ref).stop(grace=10)
        assert [p for _, p, _ in fake.requests] == ["/api/v1/vm.power-button"]
        assert status is not None and status.poweroff, status

    asyncio.run(scenario())


def test_stop_escalates_to_shutdown_then_sigterm(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = make_config(tmp_path)
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
            assert status is not None and status.signal == signal.SIGTERM
            assert not status.poweroff and status.describe() == "killed by SIGTERM"
        finally:
            await terminate(ref, grace=1)

    asyncio.run(scenario())


@pytest.mark.skipif(
    shutil.which("cloud-hypervisor") is None,
    reason="cloud-hypervisor is not on PATH (no Debian package; releases cannot be fetched here)",
)
@pytest.mark.qemu
def test_real_cloud_hypervisor_lifecycle(tmp_path: Path, agent_guest_dir: Path) -> None:
    """Boot our kernel with an empty root under the real binary: ping, info, stop."""

    async def scenario() -> None:
        cfg = make_config(
            tmp_path,
            kernel=agent_guest_dir / "vmlinuz",
            initrd=agent_guest_dir / "initramfs.img",
            cmdline='console=ttyS0 panic=-1 rdinit=/bin/sh -- -c "sleep 600"',
            shares=[],
            disks=[],
            nics=[],
            serial_pty=True,
        )
        ch = CloudHypervisor()
        vm = await ch.start(cfg)
        try:
            assert (await vm.state()) == "running"
            assert (await vm.console_pty() or "").startswith("/dev/pts/")
            assert ch.adopt(cfg) is not None
        finally:
            await vm.stop(grace=2, hard_grace=5)
        assert not vm.alive()

    asyncio.run(scenario())
