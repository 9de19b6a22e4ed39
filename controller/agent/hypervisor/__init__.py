"""VMM drivers behind one interface: cloud-hypervisor in production, QEMU as fallback.

``select_hypervisor()`` picks cloud-hypervisor when it is on PATH and boots a probe
guest (and TCG was not asked for), else QEMU.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from controller.agent.hypervisor.base import (
    VM,
    ExitRecord,
    ExitStatus,
    GuestEvent,
    GuestExit,
    Hypervisor,
    HypervisorError,
    VMStats,
    log_tail,
    still_running,
)
from controller.agent.hypervisor.cloud_hypervisor import CloudHypervisor
from controller.agent.hypervisor.qemu import Qemu

log = structlog.get_logger(__name__)

__all__ = [
    "VM",
    "CloudHypervisor",
    "ExitRecord",
    "ExitStatus",
    "GuestEvent",
    "GuestExit",
    "Hypervisor",
    "HypervisorError",
    "Qemu",
    "VMStats",
    "log_tail",
    "select_hypervisor",
    "still_running",
]


def select_hypervisor(
    choice: str = "auto",
    accel: str = "auto",
    guest_dir: Path | None = None,
    firmware: Path | None = None,
    binary: Path | None = None,
) -> Hypervisor:
    """The driver for ``choice`` (``auto``, ``cloud-hypervisor`` or ``qemu``).

    ``auto`` picks cloud-hypervisor only when it is on PATH and a probe guest (the
    container-mode kernel + initramfs in ``guest_dir``) really boots under it: nested
    KVM can expose /dev/kvm and hang every guest. Otherwise QEMU, which probes KVM the
    same way when ``accel`` is ``auto`` and falls back to TCG. ``firmware`` is
    cloud-hypervisor's for image mode (QEMU boots disks with its own SeaBIOS). ``binary``
    replaces the cloud-hypervisor found on PATH (``choice`` must be ``cloud-hypervisor``).
    """
    if choice not in ("auto", "cloud-hypervisor", "qemu"):
        raise HypervisorError(f"unknown hypervisor {choice!r} (auto, cloud-hypervisor, qemu)")
    if binary is not None:
        if choice != "cloud-hypervisor":
            raise HypervisorError(f"a VMM binary ({binary}) needs hypervisor cloud-hypervisor")
        return CloudHypervisor(str(binary), firmware=firmware)
    kernel = guest_dir / "vmlinuz" if guest_dir else None
    initrd = guest_dir / "initramfs.img" if guest_dir else None
    if choice == "cloud-hypervisor":
        if not CloudHypervisor.available():
            raise HypervisorError("hypervisor cloud-hypervisor requested but not on PATH")
        if accel == "tcg":
            raise HypervisorError("cloud-hypervisor cannot run guests under TCG")
        return CloudHypervisor(firmware=firmware)
    if choice == "auto" and accel != "tcg" and CloudHypervisor.available():
        ch = CloudHypervisor(firmware=firmware)
        if kernel and initrd and ch.runs_guests(kernel, initrd):
            return ch
        log.warning(
            "cloud-hypervisor is on PATH but cannot boot a guest here; using QEMU",
            probe_assets=bool(kernel and initrd),
        )
    return Qemu(accel=accel, probe_kernel=kernel, probe_initrd=initrd)
