"""VMM drivers behind one interface: cloud-hypervisor in production, QEMU as fallback.

``select_hypervisor()`` picks cloud-hypervisor when it is on PATH (and TCG was not asked
for), else QEMU.
"""

from __future__ import annotations

from pathlib import Path

from controller.agent.hypervisor.base import (
    VM,
    ExitStatus,
    Hypervisor,
    HypervisorError,
    VMStats,
    log_tail,
)
from controller.agent.hypervisor.cloud_hypervisor import CloudHypervisor
from controller.agent.hypervisor.qemu import Qemu

__all__ = [
    "VM",
    "CloudHypervisor",
    "ExitStatus",
    "Hypervisor",
    "HypervisorError",
    "Qemu",
    "VMStats",
    "log_tail",
    "select_hypervisor",
]


def select_hypervisor(
    choice: str = "auto",
    accel: str = "auto",
    guest_dir: Path | None = None,
    firmware: Path | None = None,
    binary: Path | None = None,
) -> Hypervisor:
    """The driver for ``choice`` (``auto``, ``cloud-hypervisor`` or ``qemu``).

    ``guest_dir`` (hack/build-guest-kernel.sh's output) lets QEMU probe whether KVM really
    runs guests when ``accel`` is ``auto``. ``firmware`` is cloud-hypervisor's for image
    mode (QEMU boots disks with its own SeaBIOS). ``binary`` replaces the
    cloud-hypervisor found on PATH (``choice`` must be ``cloud-hypervisor``).
    """
    if binary is not None:
        if choice != "cloud-hypervisor":
            raise HypervisorError(f"a VMM binary ({binary}) needs hypervisor cloud-hypervisor")
        return CloudHypervisor(str(binary), firmware=firmware)
    if choice == "cloud-hypervisor" or (
        choice == "auto" and accel != "tcg" and CloudHypervisor.available()
    ):
        if not CloudHypervisor.available():
            raise HypervisorError("hypervisor cloud-hypervisor requested but not on PATH")
        if accel == "tcg":
            raise HypervisorError("cloud-hypervisor cannot run guests under TCG")
        return CloudHypervisor(firmware=firmware)
    if choice not in ("auto", "qemu"):
        raise HypervisorError(f"unknown hypervisor {choice!r} (auto, cloud-hypervisor, qemu)")
    kernel = guest_dir / "vmlinuz" if guest_dir else None
    initrd = guest_dir / "initramfs.img" if guest_dir else None
    return Qemu(accel=accel, probe_kernel=kernel, probe_initrd=initrd)
