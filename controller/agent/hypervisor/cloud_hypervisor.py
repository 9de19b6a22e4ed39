"""cloud-hypervisor (production VMM): command line from a VMConfig, control over its API.

Launched like zos does: everything on the command line (no vm.create), ``--serial pty``
(the agent reads it, see console.py) or ``file=`` (tests), ``--console off`` (the default
``tty`` would grab the agent's terminal) and ``--memory shared=on`` because virtio-fs is a
vhost-user device. Image mode boots ``--firmware`` (rust-hypervisor-firmware) instead of
``--kernel``, as zos does. Every device gets an explicit ``id`` so ``vm.counters`` keys are
stable (``net0``, ``disk0``...), and every disk ``image_type=raw``: CH's autodetection
treats an unnamed raw image as untrusted and refuses writes to its sector 0.

Exits: ``--no-shutdown`` keeps the VMM up when the guest powers off, and
``--event-monitor`` writes CH's lifecycle events to ``cfg.events_file``; ``--log-file``
(``cfg.run_log``, truncated by CH at each start) holds this run's warnings and errors.
Together they tell a power-off from SIGTERM, ``vmm.shutdown``, a vCPU or device error
and a failed reboot, and, being files, still do after an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from controller.agent.errors import FailedPrecondition
from controller.agent.guest.vmconfig import VMConfig
from controller.agent.hypervisor.base import (
    PROBE_CMDLINE,
    VM,
    ExitStatus,
    GuestEvent,
    GuestExit,
    Hypervisor,
    HypervisorError,
    guest_boots,
    version_output,
)
from controller.agent.hypervisor.ch_api import CloudHypervisorAPI
from controller.agent.runtime import wakeups
from controller.agent.runtime.procs import ProcessRef

# CH's default log format: "cloud-hypervisor: 1.2s: <vcpu0> ERROR:vmm/src/cpu.rs:1440 -- ..."
_ERROR_LINE = re.compile(r"> ERROR:")
RUNNING_STATES = ("Running", "Paused")
EVENT_POLL_SECONDS = 0.2  # when the file or the process cannot be watched
EVENT_SAFETY_SECONDS = 30.0  # a look even without a wake-up, in case one was missed
_GUEST_EVENTS = {
    "vm/rebooting": GuestEvent.REBOOT,
    "guest/panic": GuestEvent.PANIC,
    "vm/shutdown": GuestEvent.SHUTDOWN,
}


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of an event-monitor file, in order (CH pretty-prints them and
    separates them by blank lines); a partly written last object is left out."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    decoder = json.JSONDecoder()
    events: list[dict[str, Any]] = []
    pos = 0
    while (start := text.find("{", pos)) >= 0:
        try:
            event, pos = decoder.raw_decode(text, start)
        except ValueError:
            break
        if isinstance(event, dict):
            events.append(event)
    return events


def event_names(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e.get('source')}/{e.get('event')}" for e in events]


def classify_ch_exit(
    events: list[dict[str, Any]], run_log: str, status: ExitStatus | None
) -> tuple[GuestExit, str]:
    """Why a cloud-hypervisor process ended, from its events and this run's log."""
    names = event_names(events)
    if "guest/panic" in names:
        return GuestExit.PANIC, "the guest reported a panic"
    if names.count("vm/rebooting") > names.count("vm/rebooted"):
        return GuestExit.REBOOT, "cloud-hypervisor exited while rebooting the guest"
    errors = [line for line in run_log.splitlines() if _ERROR_LINE.search(line)]
    if "vmm/shutdown" in names and (status is None or status.code == 0):
        if errors:
            return GuestExit.VMM_ERROR, f"cloud-hypervisor stopped on an error: {errors[-1]}"
        return GuestExit.HOST_STOP, "cloud-hypervisor was shut down (SIGTERM or vmm.shutdown)"
    what = status.describe() if status is not None else "status unknown"
    last = f": {errors[-1]}" if errors else ""
    return GuestExit.VMM_ERROR, f"cloud-hypervisor ended without an orderly shutdown ({what}){last}"


def powered_off_by_events(events: list[dict[str, Any]]) -> bool:
    """With --no-shutdown a guest power-off ends in vm/shutdown and the VMM stays up."""
    lifecycle = [n for n in event_names(events) if n.startswith(("vm/", "vmm/"))]
    return bool(lifecycle) and lifecycle[-1] == "vm/shutdown"


class CloudHypervisorVM(VM):
    def __init__(self, cfg: VMConfig, ref: ProcessRef) -> None:
        super().__init__(cfg, ref)
        self.api = CloudHypervisorAPI(cfg.api_socket)

    async def ready(self) -> bool:
        try:
            info = await self.api.info()
        except HypervisorError:
            return False
        return info.get("state") in RUNNING_STATES

    async def guest_powered_off(self) -> bool:
        if not powered_off_by_events(read_events(self.cfg.events_file)):
            return False
        # SIGTERM and vmm.shutdown write vm/shutdown too, then vm/deleted and vmm/shutdown,
        # all in one step of CH's control loop, which also answers the API: a VM state
        # after that step, with vm/shutdown still last, is the guest's power-off. A VMM on
        # its way out answers with an error or not at all (HypervisorError: undecided).
        state = (await self.api.info()).get("state")
        return state not in RUNNING_STATES and powered_off_by_events(
            read_events(self.cfg.events_file)
        )

    def classify_exit(self, status: ExitStatus | None) -> tuple[GuestExit, str]:
        try:
            run_log = self.cfg.run_log.read_text(errors="replace")
        except OSError:
            run_log = ""
        return classify_ch_exit(read_events(self.cfg.events_file), run_log, status)

    async def follow_events(self, on_event: Callable[[GuestEvent], None]) -> None:
        # CH writes the file itself; read what it added, as long as it runs: woken when
        # the file changes or the VMM exits, polling only where those cannot be watched.
        seen = 0
        with wakeups.changes(self.cfg.events_file, self.ref.pid) as (changed, watched):
            while True:
                changed.clear()  # before reading: a write from here on wakes the wait
                alive = self.alive()  # before reading, so the last events are not missed
                events = read_events(self.cfg.events_file)
                for name in event_names(events[seen:]):
                    if name in _GUEST_EVENTS:
                        on_event(_GUEST_EVENTS[name])
                seen = len(events)
                if not alive:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(), EVENT_SAFETY_SECONDS if watched else EVENT_POLL_SECONDS
                    )

    async def pause(self) -> None:
        await self.api.pause()

    async def resume(self) -> None:
        await self.api.resume()

    async def power_button(self) -> None:
        await self.api.power_button()

    async def hard_stop(self) -> None:
        # vm.shutdown alone leaves an idle VMM behind; vmm.shutdown makes it exit, and
        # must be tried even when vm.shutdown fails (e.g. the VM is already shut down).
        try:
            await self.api.shutdown()
        finally:
            await self.api.vmm_shutdown()

    async def state(self) -> str:
        info = await self.api.info()
        return str(info.get("state", "unknown")).lower()

    async def counters(self) -> dict[str, dict[str, int]]:
        return await self.api.counters()

    async def console_pty(self) -> str | None:
        serial = (await self.api.info()).get("config", {}).get("serial", {})
        return serial.get("file") if serial.get("mode") == "Pty" else None


class CloudHypervisor(Hypervisor):
    name = "cloud-hypervisor"
    reboot_reconnects_shares = True

    def __init__(self, binary: str = "cloud-hypervisor", firmware: Path | None = None) -> None:
        """``firmware``: rust-hypervisor-firmware (zos ships it as ``hypervisor-fw``), which
        boots a disk image's own loader; CH has no BIOS of its own."""
        super().__init__(binary)
        self.firmware = firmware

    def require_disk_boot(self) -> None:
        if self.firmware is None:
            raise FailedPrecondition(
                "image mode under cloud-hypervisor needs a firmware: start the agent with "
                "--firmware (ZMACHINE_AGENT_FIRMWARE) naming rust-hypervisor-firmware "
                "(hypervisor-fw)"
            )
        if not self.firmware.is_file():
            raise FailedPrecondition(f"--firmware {self.firmware} is not a file")

    def version(self) -> str:
        # "cloud-hypervisor v39.0" -> "39.0"
        words = version_output(self.binary).split()
        return words[-1].lstrip("v") if words else "unknown"

    def acceleration(self) -> str:
        return "kvm"  # cloud-hypervisor has no emulation fallback

    def command(self, cfg: VMConfig) -> list[str]:
        argv = [self.binary, "--api-socket", str(cfg.api_socket), *self._payload(cfg)]
        argv += ["--event-monitor", f"path={cfg.events_file}", "--no-shutdown"]
        argv += ["--log-file", str(cfg.run_log)]
        argv += [
            "--cpus",
            f"boot={cfg.cpus}",
            "--memory",
            f"size={cfg.memory_mib}M,shared=on",
        ]
        if cfg.shares:
            argv += [
                "--fs",
                *(f"tag={s.tag},socket={s.socket},id=fs{i}" for i, s in enumerate(cfg.shares)),
            ]
        if cfg.disks:
            argv += [
                "--disk",
                *(
                    f"path={d.path},readonly={'on' if d.readonly else 'off'},"
                    f"image_type=raw,id=disk{i}"
                    for i, d in enumerate(cfg.disks)
                ),
            ]
        if cfg.nics:
            argv += [
                "--net",
                *(f"tap={n.tap},mac={n.mac},id=net{i}" for i, n in enumerate(cfg.nics)),
            ]
        serial = "pty" if cfg.serial_pty else f"file={cfg.serial_log}"
        return [*argv, "--serial", serial, "--console", "off"]

    def _payload(self, cfg: VMConfig) -> list[str]:
        """Direct kernel boot, or (image mode) the firmware, which boots disks[0]."""
        if cfg.kernel is None:
            self.require_disk_boot()
            return ["--firmware", str(self.firmware)]
        initrd = ["--initramfs", str(cfg.initrd)] if cfg.initrd is not None else []
        return ["--kernel", str(cfg.kernel), *initrd, "--cmdline", cfg.cmdline]

    def attach(self, cfg: VMConfig, ref: ProcessRef) -> CloudHypervisorVM:
        return CloudHypervisorVM(cfg, ref)

    @staticmethod
    def available() -> bool:
        return shutil.which("cloud-hypervisor") is not None

    def runs_guests(self, kernel: Path, initrd: Path, timeout: float = 20.0) -> bool:
        """Whether KVM really runs a guest under this binary (a probe boot, cached)."""
        return ch_runs_guests(self.binary, kernel, initrd, timeout)


@cache
def ch_runs_guests(binary: str, kernel: Path, initrd: Path, timeout: float) -> bool:
    def argv(serial: Path) -> list[str]:
        return [
            binary,
            "--kernel",
            str(kernel),
            "--initramfs",
            str(initrd),
            "--cmdline",
            PROBE_CMDLINE,
            "--memory",
            "size=256M",
            "--serial",
            f"file={serial}",
            "--console",
            "off",
        ]

    return guest_boots("cloud-hypervisor", argv, timeout)
