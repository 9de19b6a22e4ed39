"""cloud-hypervisor (production VMM): command line from a VMConfig, control over its API.

Launched like zos does: everything on the command line (no vm.create), ``--serial pty`` or
``file=``, ``--console off`` (the default ``tty`` would grab the agent's terminal) and
``--memory shared=on`` because virtio-fs is a vhost-user device. Image mode boots
``--firmware`` (rust-hypervisor-firmware) instead of ``--kernel``, as zos does. Every device gets an
explicit ``id`` so ``vm.counters`` keys are stable (``net0``, ``disk0``...).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from controller.agent.errors import FailedPrecondition
from controller.agent.hypervisor.base import VM, Hypervisor, HypervisorError, version_output
from controller.agent.hypervisor.ch_api import CloudHypervisorAPI
from controller.agent.procs import ProcessRef
from controller.agent.vmconfig import VMConfig


class CloudHypervisorVM(VM):
    def __init__(self, cfg: VMConfig, ref: ProcessRef) -> None:
        super().__init__(cfg, ref)
        self.api = CloudHypervisorAPI(cfg.api_socket)

    async def ready(self) -> bool:
        try:
            await self.api.ping()
        except HypervisorError:
            return False
        return True

    async def pause(self) -> None:
        await self.api.pause()

    async def resume(self) -> None:
        await self.api.resume()

    async def power_button(self) -> None:
        await self.api.power_button()

    async def hard_stop(self) -> None:
        # vm.shutdown alone leaves an idle VMM behind; vmm.shutdown makes it exit.
        await self.api.shutdown()
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
                    f"path={d.path},readonly={'on' if d.readonly else 'off'},id=disk{i}"
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
