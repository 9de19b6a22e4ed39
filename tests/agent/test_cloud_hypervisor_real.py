"""The real cloud-hypervisor binary in the production configuration (opt-in: skipped
when ``cloud-hypervisor`` is not on PATH).

virtiofsd root share, a raw data disk and a read-only one, a tap in a test network
namespace (the VMM runs there through nsenter), PTY serial, the event monitor. Guests
hang under nested KVM on the development machine, but the VMM and its API run for real:
what is checked here is the VMM's side (devices, counters, pause/resume, the API socket
lock, adoption, exit classification, a VMM-side reboot that reconnects virtio-fs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from controller.agent.guest.virtiofs import Flavor, Virtiofsd, find_virtiofsd, start_virtiofsd
from controller.agent.guest.vmconfig import BootMode, Disk, FsShare, Nic, VMConfig, kernel_cmdline
from controller.agent.hypervisor import (
    CloudHypervisor,
    GuestEvent,
    GuestExit,
    HypervisorError,
    select_hypervisor,
    still_running,
)
from controller.agent.hypervisor.cloud_hypervisor import CloudHypervisorVM, event_names, read_events
from controller.agent.network.local import create_tap, delete_tap, mac_address, tap_name
from controller.agent.runtime.console import ConsoleStream
from controller.agent.runtime.procs import ProcessRef, terminate
from tests.agent.conftest import guest_busybox_root

pytestmark = [
    pytest.mark.skipif(
        shutil.which("cloud-hypervisor") is None,
        reason="cloud-hypervisor is not on PATH (build it from source: docs/guest-boot.md)",
    ),
    pytest.mark.timeout(180),
]


RUST_VIRTIOFSD = os.environ.get("ZM_VIRTIOFSD_RS") or shutil.which("virtiofsd")


async def start_share(share: FsShare, log: Path) -> ProcessRef:
    """Production pairs CH with the Rust virtiofsd; QEMU's C daemon where it is missing."""
    rust = Virtiofsd(Path(RUST_VIRTIOFSD), Flavor.RUST) if RUST_VIRTIOFSD else None
    return await start_virtiofsd(share, log, daemon=rust or find_virtiofsd())


def production_config(tmp: Path, guest_dir: Path, netns: str, bridge: str) -> VMConfig:
    root = guest_busybox_root(tmp / "root")
    data = tmp / "vol.img"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    seed = tmp / "seed.img"
    seed.write_bytes(b"\0" * (1 << 20))
    uid = f"ch-{tmp.name}"[-20:]
    nic = Nic(tap_name(uid, 0), mac_address(uid, 0))
    create_tap(nic.tap, bridge, netns)
    run = tmp / "run"
    run.mkdir()
    return VMConfig(
        vm_id=uid,
        cpus=1,
        memory_mib=256,
        kernel=guest_dir / "vmlinuz",
        initrd=guest_dir / "initramfs.img",
        cmdline=kernel_cmdline(BootMode.CONTAINER),
        shares=[FsShare("vroot", run / "vfs-root.sock", root)],
        disks=[Disk(data), Disk(seed, readonly=True)],
        nics=[nic],
        serial_log=tmp / "console.log",
        api_socket=run / "vmm.sock",
        state_dir=tmp / "state",
        netns=netns,
        serial_pty=True,
    )


@asynccontextmanager
async def running_ch(
    cfg: VMConfig, tmp: Path
) -> AsyncIterator[tuple[CloudHypervisorVM, list[ProcessRef]]]:
    """virtiofsd, then cloud-hypervisor; everything stopped and removed afterwards."""
    helpers = [await start_share(s, tmp / f"virtiofsd-{s.tag}.log") for s in cfg.shares]
    vm: CloudHypervisorVM | None = None
    try:
        started = await CloudHypervisor().start(cfg)
        assert isinstance(started, CloudHypervisorVM)
        vm = started
        yield vm, helpers
    finally:
        if vm is not None:
            await vm.stop(grace=1, hard_grace=5, term_grace=5)
        for ref in helpers:
            await terminate(ref, grace=2)
        for nic in cfg.nics:
            delete_tap(nic.tap, cfg.netns)


def test_production_configuration(
    tmp_path: Path, agent_guest_dir: Path, guest_netns: tuple[str, str, str]
) -> None:
    """Devices as configured (raw disks), counters, pause/resume, the PTY read by the
    console stream, a second instance refused on the live socket, and an exit asked
    for over the API classified as HOST_STOP although CH exits 0."""
    netns, bridge, _ = guest_netns
    cfg = production_config(tmp_path, agent_guest_dir, netns, bridge)

    async def scenario() -> None:
        async with running_ch(cfg, tmp_path) as (vm, _):
            assert await vm.ready()
            info = await vm.api.info()
            assert info["state"] == "Running"
            disks = {d["id"]: d for d in info["config"]["disks"]}
            assert {d["image_type"] for d in disks.values()} == {"Raw"}
            assert disks["disk1"]["readonly"] is True
            assert info["config"]["serial"]["mode"] == "Pty"
            pty = await vm.console_pty()
            assert pty is not None and pty.startswith("/dev/pts/")
            counters = await vm.counters()
            assert {"disk0", "disk1", "net0"} <= set(counters), counters
            assert "rx_bytes" in counters["net0"] and "read_bytes" in counters["disk0"]

            await vm.pause()
            assert await vm.state() == "paused"
            await vm.resume()
            assert await vm.state() == "running"

            stream = ConsoleStream(cfg.serial_log, 1 << 20, 1)
            follower = asyncio.create_task(stream.follow(vm))

            # Our start refuses on the held lock; CH itself refuses too, and the first
            # instance's socket still answers afterwards. (The bypass gets files of its
            # own: CH truncates its --log-file and --event-monitor before it looks at
            # the lock, which is one more reason to refuse before spawning.)
            with pytest.raises(HypervisorError, match="second one"):
                await CloudHypervisor().start(cfg)
            own_files = dataclasses.replace(cfg, state_dir=tmp_path / "second")
            own_files.state_dir.mkdir()
            argv = CloudHypervisor().command(own_files)
            second = await asyncio.to_thread(
                subprocess.run,
                ["nsenter", f"--net=/run/netns/{netns}", "--", *argv],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert second.returncode != 0
            assert "in use" in (second.stdout + second.stderr).lower(), second.stderr
            assert await vm.ready()

            await vm.api.vmm_shutdown()  # someone else than the agent's stop()
            assert await vm.wait(20), "cloud-hypervisor did not exit on vmm.shutdown"
            await asyncio.wait_for(follower, 5)  # the stream ends with the VMM
            status = vm.exit_status()
            assert status is not None and status.code == 0
            ended = await vm.guest_exit()
            assert ended is not None and ended.exit is GuestExit.HOST_STOP, ended
            assert "vmm/shutdown" in event_names(read_events(cfg.events_file))

    asyncio.run(scenario())


def _start_and_wait_to_be_killed(cfg: VMConfig, started: Path) -> None:
    """An 'agent' process: starts the VMM, says so, then idles until SIGKILLed."""

    asyncio.run(CloudHypervisor().start(cfg))
    started.write_text("ok")
    time.sleep(600)


def test_adoption_after_agent_sigkill_and_sigterm_classification(
    tmp_path: Path, agent_guest_dir: Path, guest_netns: tuple[str, str, str]
) -> None:
    netns, bridge, _ = guest_netns
    cfg = production_config(tmp_path, agent_guest_dir, netns, bridge)

    async def scenario() -> None:
        helpers = [await start_share(s, tmp_path / "virtiofsd.log") for s in cfg.shares]
        started = tmp_path / "started"
        agent = multiprocessing.get_context("spawn").Process(
            target=_start_and_wait_to_be_killed, args=(cfg, started)
        )
        agent.start()
        vm = None
        try:
            deadline = time.monotonic() + 60
            while not started.exists():
                assert agent.is_alive() and time.monotonic() < deadline, "agent did not start CH"
                await asyncio.sleep(0.1)
            os.kill(agent.pid or 0, signal.SIGKILL)
            agent.join(10)
            vm = CloudHypervisor().adopt(cfg)
            assert vm is not None, "the VMM did not outlive the agent that started it"
            assert await vm.ready()
            assert (await vm.console_pty() or "").startswith("/dev/pts/")
            assert vm.exit_status() is None  # not our child
            os.kill(vm.ref.pid, signal.SIGTERM)  # CH exits 0 on it
            assert await vm.wait(20), "cloud-hypervisor did not exit on SIGTERM"
            ended = await vm.guest_exit()
            assert ended is not None and ended.exit is GuestExit.HOST_STOP, ended
        finally:
            if vm is not None and vm.alive():
                await vm.stop(grace=1, hard_grace=5)
            for ref in helpers:
                await terminate(ref, grace=2)
            delete_tap(cfg.nics[0].tap, netns)

    asyncio.run(scenario())


def test_reboot_reconnects_virtiofs_when_virtiofsd_is_restarted_on_the_event(
    tmp_path: Path, agent_guest_dir: Path, guest_netns: tuple[str, str, str]
) -> None:
    """CH rebuilds the devices on a reboot (here a VMM-side ``vm.reboot``: the guest
    hangs before it could reboot itself) and virtiofsd exits with the old connection.
    Restarted on the vm/rebooting event, as the agent does, CH reconnects and finishes
    the reboot (vm/rebooted) instead of waiting 60 s and exiting 1."""
    netns, bridge, _ = guest_netns
    cfg = production_config(tmp_path, agent_guest_dir, netns, bridge)
    share = cfg.shares[0]

    async def scenario() -> None:
        async with running_ch(cfg, tmp_path) as (vm, helpers):
            first = helpers[0]

            async def restart_on_reboot() -> None:
                reboots: asyncio.Queue[GuestEvent] = asyncio.Queue()
                follower = asyncio.create_task(vm.follow_events(reboots.put_nowait))
                try:
                    while await reboots.get() is not GuestEvent.REBOOT:
                        pass
                    deadline = time.monotonic() + 10
                    while still_running(first):
                        assert time.monotonic() < deadline, "virtiofsd did not exit"
                        await asyncio.sleep(0.05)
                    helpers.append(await start_share(share, tmp_path / "virtiofsd-2.log"))
                finally:
                    follower.cancel()

            stream = ConsoleStream(cfg.serial_log, 1 << 20, 1)
            console = asyncio.create_task(stream.follow(vm))
            old_pty = await vm.console_pty()
            await wait_open(old_pty)
            restarter = asyncio.create_task(restart_on_reboot())
            started = time.monotonic()
            vm.api.timeout = 70
            await vm.api.request("PUT", "vm.reboot")  # returns once CH has rebooted
            took = time.monotonic() - started
            await asyncio.wait_for(restarter, 5)
            # CH answers the request, and its event monitor thread writes vm/rebooted to
            # the file beside it: the line may land just after the reply.
            deadline = time.monotonic() + 5
            while (names := event_names(read_events(cfg.events_file))).count("vm/rebooted") < 1:
                assert time.monotonic() < deadline, names
                await asyncio.sleep(0.05)
            assert names.count("vm/rebooted") == 1, names
            assert took < 20, f"reboot took {took:.0f}s"
            assert vm.alive() and await vm.ready()
            # CH made a new PTY for the rebooted VM (the kernel may give it the number the
            # old one freed); the console stream reads that one.
            await wait_open(await vm.console_pty())
            console.cancel()

    asyncio.run(scenario())


def open_by_us(path: str | None) -> bool:
    targets = []
    for fd in Path(f"/proc/{os.getpid()}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            targets.append(os.readlink(fd))
    return path is not None and path in targets


async def wait_open(path: str | None, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while not open_by_us(path):
        assert time.monotonic() < deadline, f"the console stream did not open {path}"
        await asyncio.sleep(0.05)


def test_auto_selection_probes_the_real_binary(agent_guest_dir: Path) -> None:
    """Here guests hang under nested KVM: auto must not pick cloud-hypervisor."""
    chosen = select_hypervisor("auto", "auto", agent_guest_dir)
    assets = (agent_guest_dir / "vmlinuz", agent_guest_dir / "initramfs.img")
    booted = CloudHypervisor().runs_guests(*assets)
    assert chosen.name == ("cloud-hypervisor" if booted else "qemu")
