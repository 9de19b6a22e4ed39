"""QEMU driver, for nodes without cloud-hypervisor (and for tests, under TCG).

Same guest view as cloud-hypervisor: virtio-fs via vhost-user-fs-pci (guest RAM must be
a shared memfd), virtio-blk disks, virtio-net taps, the serial console on ttyS0. Control
goes over QMP on ``cfg.api_socket``.

Acceleration: ``kvm`` only if KVM actually runs a Linux guest on this host (a probe boot
of the guest kernel that must print a marker and power off), else ``tcg``. Nested KVM can
expose /dev/kvm and still crash or hang every guest, so /dev/kvm alone proves nothing.
The choice can be forced with ``accel=`` or the environment variable ``ZM_ACCEL``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from controller.agent.errors import InvalidSpec
from controller.agent.guest.vmconfig import MAX_SOCKET_PATH, VMConfig
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
from controller.agent.hypervisor.qmp import QMP, follow_events
from controller.agent.runtime.procs import ProcessRef

ACCELS = ("auto", "kvm", "tcg")
# TCG's translation cache: QEMU's default is 1 GiB, which an idle guest fills over time and
# which made a TCG VM with 256 MiB of guest RAM cost over 1 GiB of host RSS. A smaller cache
# only costs retranslation when the guest's hot code outgrows it.
TCG_TB_SIZE_MIB = 64


def events_socket(cfg: VMConfig) -> Path:
    """A second QMP monitor, held by the agent's event follower (a monitor socket serves
    one client at a time, and commands connect per call)."""
    return cfg.api_socket.with_name(cfg.api_socket.stem + "-ev.sock")


def classify_qemu_exit(
    events: list[dict[str, Any]], status: ExitStatus | None
) -> tuple[GuestExit, str]:
    """Why a QEMU process ended, from the QMP events the agent recorded and its status.

    With -no-shutdown a guest power-off does not end QEMU, so an exit is the host's doing
    (SIGTERM, quit) or a failure, unless the events say the guest went first.
    """
    names = [str(e.get("event")) for e in events]
    if "GUEST_PANICKED" in names:
        return GuestExit.PANIC, "the guest reported a panic"
    shutdowns = [e.get("data", {}) for e in events if e.get("event") == "SHUTDOWN"]
    if shutdowns:
        last = shutdowns[-1]
        reason = str(last.get("reason", ""))
        if reason == "guest-panic":
            return GuestExit.PANIC, "the guest panicked"
        if last.get("guest"):
            return GuestExit.POWEROFF, f"the guest powered off ({reason})"
        if status is None or status.code == 0:
            return GuestExit.HOST_STOP, f"QEMU was shut down ({reason})"
    what = status.describe() if status is not None else "status unknown"
    if status is not None and status.code == 0:
        return GuestExit.HOST_STOP, f"QEMU {what} without a recorded reason"
    return GuestExit.VMM_ERROR, f"QEMU ended without an orderly shutdown ({what})"


def read_event_lines(path: Path) -> list[dict[str, Any]]:
    """The QMP events the agent appended to ``path``, one JSON object per line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return events


class QemuVM(VM):
    def __init__(self, cfg: VMConfig, ref: ProcessRef) -> None:
        super().__init__(cfg, ref)
        self.qmp = QMP(cfg.api_socket)

    async def ready(self) -> bool:
        try:
            status = await self.qmp.execute("query-status")
        except HypervisorError:
            return False
        return status.get("status") in ("running", "paused")

    async def guest_powered_off(self) -> bool:
        status = await self.qmp.execute("query-status")
        return bool(status.get("status") == "shutdown")

    def classify_exit(self, status: ExitStatus | None) -> tuple[GuestExit, str]:
        return classify_qemu_exit(read_event_lines(self.cfg.events_file), status)

    async def follow_events(self, on_event: Callable[[GuestEvent], None]) -> None:
        def seen(event: dict[str, Any]) -> None:
            with open(self.cfg.events_file, "a") as f:
                f.write(json.dumps(event) + "\n")
            name, data = event.get("event"), event.get("data", {})
            if name == "RESET" and data.get("guest"):
                on_event(GuestEvent.REBOOT)
            elif name == "GUEST_PANICKED":
                on_event(GuestEvent.PANIC)
            elif name == "SHUTDOWN":
                on_event(GuestEvent.SHUTDOWN)

        await follow_events(events_socket(self.cfg), seen)

    async def pause(self) -> None:
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        await self.qmp.execute("cont")

    async def power_button(self) -> None:
        await self.qmp.execute("system_powerdown")

    async def hard_stop(self) -> None:
        await self.qmp.execute("quit")

    async def state(self) -> str:
        status = await self.qmp.execute("query-status")
        return str(status.get("status", "unknown"))

    async def counters(self) -> dict[str, dict[str, int]]:
        """Per-disk counters named like cloud-hypervisor's vm.counters (``disk0``...)."""
        result: dict[str, dict[str, int]] = {}
        for dev in await self.qmp.execute("query-blockstats"):
            stats = dev.get("stats", {})
            result[str(dev.get("device"))] = {
                "read_bytes": int(stats.get("rd_bytes", 0)),
                "write_bytes": int(stats.get("wr_bytes", 0)),
                "read_ops": int(stats.get("rd_operations", 0)),
                "write_ops": int(stats.get("wr_operations", 0)),
            }
        return result

    async def console_pty(self) -> str | None:
        for dev in await self.qmp.execute("query-chardev"):
            if dev.get("label") == "serial0" and str(dev.get("filename", "")).startswith("pty:"):
                return str(dev["filename"])[len("pty:") :]
        return None


class Qemu(Hypervisor):
    name = "qemu"

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        accel: str = "auto",
        probe_kernel: Path | None = None,
        probe_initrd: Path | None = None,
    ) -> None:
        """``probe_kernel``/``probe_initrd``: the container-mode guest assets (the initrd
        must have /bin/sh), booted once under KVM to decide ``auto``; without them
        ``auto`` means TCG."""
        super().__init__(binary)
        if accel == "auto":
            accel = os.environ.get("ZM_ACCEL", "auto") or "auto"
        if accel not in ACCELS:
            raise HypervisorError(f"qemu: accel {accel!r} is not one of {ACCELS}")
        self._accel = accel
        self.probe_kernel = probe_kernel
        self.probe_initrd = probe_initrd

    def version(self) -> str:
        # "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)" -> "7.2.22"
        words = version_output(self.binary).split()
        return words[3] if len(words) > 3 else "unknown"

    def acceleration(self) -> str:
        """May boot a probe guest the first time (a few seconds, at most ~20 s)."""
        if self._accel == "auto":
            self._accel = (
                "kvm"
                if self.probe_kernel
                and self.probe_initrd
                and kvm_runs_guests(self.binary, self.probe_kernel, self.probe_initrd)
                else "tcg"
            )
        return self._accel

    def command(self, cfg: VMConfig) -> list[str]:
        if len(bytes(events_socket(cfg))) > MAX_SOCKET_PATH:
            raise InvalidSpec(f"vm {cfg.vm_id!r}: socket path {events_socket(cfg)} is too long")
        accel = self.acceleration()
        mem = f"{cfg.memory_mib}M"
        argv = [
            self.binary,
            "-name",
            f"zm-{cfg.vm_id}",
            "-machine",
            "q35,memory-backend=ram0",
            "-accel",
            accel if accel == "kvm" else f"tcg,tb-size={TCG_TB_SIZE_MIB}",
            "-cpu",
            "host" if accel == "kvm" else "max",
            "-smp",
            str(cfg.cpus),
            "-m",
            mem,
            # vhost-user (virtiofsd) maps guest RAM, so it must be a shared memfd.
            "-object",
            f"memory-backend-memfd,id=ram0,size={mem},share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            *_kernel_args(cfg),
        ]
        # (backend option, backend, frontend device) per share, disk and NIC.
        devices = [
            *(
                (
                    "-chardev",
                    f"socket,id=fs{i},path={s.socket}",
                    f"vhost-user-fs-pci,chardev=fs{i},tag={s.tag}",
                )
                for i, s in enumerate(cfg.shares)
            ),
            *(
                (
                    "-drive",
                    f"file={d.path},if=none,id=disk{i},format=raw,"
                    f"readonly={'on' if d.readonly else 'off'}",
                    f"virtio-blk-pci,drive=disk{i}"
                    # A disk boot: SeaBIOS boots this one (a direct kernel boot needs none).
                    + (",bootindex=0" if i == 0 and cfg.disk_boot else ""),
                )
                for i, d in enumerate(cfg.disks)
            ),
            *(
                (
                    "-netdev",
                    f"tap,id=net{i},ifname={n.tap},script=no,downscript=no",
                    f"virtio-net-pci,netdev=net{i},mac={n.mac}",
                )
                for i, n in enumerate(cfg.nics)
            ),
        ]
        for option, backend, device in devices:
            argv += [option, backend, "-device", device]
        # With a PTY the agent reads the console and writes serial_log (console.py).
        serial = "pty,id=serial0"
        if not cfg.serial_pty:
            serial = f"null,id=serial0,logfile={cfg.serial_log},logappend=on"
        argv += [
            "-chardev",
            serial,
            "-serial",
            "chardev:serial0",
            "-qmp",
            f"unix:{cfg.api_socket},server=on,wait=off",
            "-qmp",
            f"unix:{events_socket(cfg)},server=on,wait=off",
            # A guest power-off stops the VM but keeps QEMU, so the agent can tell it
            # from a QEMU exit (see GuestExit); reboots stay inside QEMU.
            "-no-shutdown",
        ]
        return argv

    def clear_stale_socket(self, cfg: VMConfig) -> None:
        super().clear_stale_socket(cfg)
        events_socket(cfg).unlink(missing_ok=True)
        cfg.events_file.unlink(missing_ok=True)  # the events of the previous QEMU

    def require_disk_boot(self) -> None:
        """Always possible: QEMU's default firmware (SeaBIOS) boots disks."""

    def attach(self, cfg: VMConfig, ref: ProcessRef) -> QemuVM:
        return QemuVM(cfg, ref)


def _kernel_args(cfg: VMConfig) -> list[str]:
    """Direct kernel boot; for a disk boot nothing: QEMU's default SeaBIOS boots the
    first disk (``bootindex=0``), as the hypervisor firmware does under cloud-hypervisor."""
    if cfg.kernel is None:
        return []
    initrd = ["-initrd", str(cfg.initrd)] if cfg.initrd is not None else []
    return ["-kernel", str(cfg.kernel), *initrd, "-append", cfg.cmdline]


@cache
def kvm_runs_guests(binary: str, kernel: Path, initrd: Path, timeout: float = 20.0) -> bool:
    """Boot ``kernel`` under KVM with a shell that prints a marker and powers off."""

    def argv(serial: Path) -> list[str]:
        return [
            binary,
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            PROBE_CMDLINE,
            "-serial",
            f"file:{serial}",
        ]

    return guest_boots("qemu", argv, timeout)
