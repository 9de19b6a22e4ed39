"""Provisioning in zos's order, and its exact inverse.

provision(): fetch + mount the flist read-only, overlay with a per-VM upper dir (SSH host
keys removed on first creation), detect the boot mode, write the seed, create taps,
disks and shares, then launch(): virtiofsd, then the hypervisor, each detached in its
own session. teardown() undoes all of it and is idempotent: it checks what exists, so
it also cleans up after a Deploy that failed half-way.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import structlog

from controller.agent import boot
from controller.agent.config import AgentConfig
from controller.agent.errors import AgentError, InvalidSpec, ProvisionFailed
from controller.agent.layout import VMPaths
from controller.agent.procs import spawn_detached, terminate
from controller.agent.spec import VolumeKind
from controller.agent.state import MachineRecord, NicStatus, State
from controller.flist import bootmode, fetch, mount, overlay

log = structlog.get_logger(__name__)

# Printed by the container-mode initramfs right before it hands over to the entrypoint.
BOOTED_MARKER = b"zm-init: switching root"
LOG_TAIL_BYTES = 2048
MOUNT_TIMEOUT = 30.0


def tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - size, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Provisioner:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = boot.HostBoot(config)

    def paths(self, rec: MachineRecord) -> VMPaths:
        return VMPaths.for_uid(self.config.state_dir, rec.ref.uid)

    def hypervisor_info(self) -> boot.HypervisorInfo:
        return self.host.info()

    def _log(self, rec: MachineRecord) -> structlog.stdlib.BoundLogger:
        bound: structlog.stdlib.BoundLogger = log.bind(
            zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid
        )
        return bound

    # ----------------------------------------------------------------- provision

    async def provision(self, rec: MachineRecord, fresh: bool) -> None:
        p = self.paths(rec)
        lg = self._log(rec)
        first = not p.upper.exists()
        for d in (p.root, p.run, p.upper, p.work, p.rootfs, p.lower):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        step = "flist"
        try:
            flist = await asyncio.to_thread(
                fetch.fetch_flist, rec.spec.flist, self.config.flist_cache
            )
            step = "flist mount"
            await self._mount_flist(rec, flist)
            step = "overlay"
            await asyncio.to_thread(overlay.mount_overlay, p.lower, p.upper, p.work, p.rootfs)
            if first:
                for key in (p.rootfs / "etc" / "ssh").glob("ssh_host_*"):
                    key.unlink()
            step = "boot mode"
            info = bootmode.detect_boot_mode(p.rootfs)
            if info.mode is bootmode.BootMode.IMAGE:
                raise InvalidSpec(
                    f"zmachine {rec.ref}: spec.flist {rec.spec.flist} is a disk image "
                    "(/image.raw); image mode is not supported by this agent yet"
                )
            rec.boot_mode = info.mode.value
            step = "volumes"
            self._volumes(rec)
            step = "network"
            rec.nics = [
                NicStatus(n.network, n.ip, n.mac, n.tap) for n in await self.host.create_nics(rec)
            ]
            step = "seed"
            await self.host.write_seed(rec, p)
            step = "launch"
            await self.launch(rec)
        except AgentError:
            raise
        except Exception as exc:
            raise ProvisionFailed(step, exc, tail(p.vmm_log) + tail(p.console_log)) from exc
        lg.info("provisioned", boot_mode=rec.boot_mode, fresh=fresh, first=first)

    async def _mount_flist(self, rec: MachineRecord, flist: Path) -> None:
        p = self.paths(rec)
        if mount.is_mounted(p.lower):
            return
        argv = mount.mount_command(flist, p.lower, self.config.flist_cache)
        ref = spawn_detached(argv, p.mount_log, str(p.lower))
        rec.helpers.append(ref)
        try:
            await asyncio.to_thread(mount.wait_mounted, p.lower, MOUNT_TIMEOUT)
        except Exception as exc:
            raise ProvisionFailed("flist mount", exc, tail(p.mount_log)) from exc

    def _volumes(self, rec: MachineRecord) -> None:
        p = self.paths(rec)
        for v in rec.spec.volumes:
            path = p.volume(v.name, v.kind is VolumeKind.DISK)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if v.kind is VolumeKind.DISK:
                if not path.exists():
                    with open(path, "wb") as f:
                        f.truncate(v.size_bytes)  # sparse
            else:
                path.mkdir(exist_ok=True, mode=0o755)

    async def launch(self, rec: MachineRecord) -> None:
        """Start virtiofsd(s) and the VMM; used by provision and by every restart."""
        p = self.paths(rec)
        rec.helpers = [h for h in rec.helpers if h.marker == str(p.lower)]
        rec.helpers += await self.host.start_shares(rec, p)
        rec.started_at = time.time()
        rec.boot_duration = 0.0
        rec.vmm = await self.host.start_vmm(rec, p)
        rec.hypervisor = self.host.info().name
        rec.state, rec.reason, rec.message, rec.log_tail = State.RUNNING, "", "", ""
        if rec.spec.paused:
            await self.pause(rec)

    # ----------------------------------------------------------------- runtime

    async def pause(self, rec: MachineRecord) -> None:
        await self.host.pause(rec, self.paths(rec))
        rec.state = State.PAUSED

    async def resume(self, rec: MachineRecord) -> None:
        await self.host.resume(rec, self.paths(rec))
        rec.state = State.RUNNING

    async def adopt(self, rec: MachineRecord) -> None:
        """After an agent restart: keep a live VMM as it is; otherwise let the supervisor
        apply the restart policy (the mounts are re-made by launch if needed)."""
        p = self.paths(rec)
        if rec.vmm is not None and rec.vmm.alive():
            self._log(rec).info("adopted running vm", pid=rec.vmm.pid)
            return
        if rec.state in (State.RUNNING, State.PAUSED, State.PROVISIONING):
            self._log(rec).warning("vm not running after agent restart")
            if not mount.is_mounted(p.rootfs):
                flist = await asyncio.to_thread(
                    fetch.fetch_flist, rec.spec.flist, self.config.flist_cache
                )
                await self._mount_flist(rec, flist)
                await asyncio.to_thread(overlay.mount_overlay, p.lower, p.upper, p.work, p.rootfs)
            rec.state = State.RUNNING  # the supervisor sees the dead VMM and applies policy

    def observe(self, rec: MachineRecord) -> None:
        """Periodic bookkeeping of a live VM: boot duration and serial log rotation."""
        p = self.paths(rec)
        if not rec.boot_duration:
            try:
                data = p.console_log.read_bytes()
            except OSError:
                data = b""
            if BOOTED_MARKER in data:
                rec.boot_duration = time.time() - rec.started_at
        for path in (p.console_log, p.vmm_log):
            rotate(path, self.config.log_rotate_bytes)

    def log_tail(self, rec: MachineRecord) -> str:
        p = self.paths(rec)
        return tail(p.console_log) or tail(p.vmm_log)

    async def stats(self, rec: MachineRecord) -> boot.VMStats:
        return await self.host.stats(rec, self.paths(rec))

    # ----------------------------------------------------------------- teardown

    async def stop(self, rec: MachineRecord) -> None:
        """Stop the VMM and the virtiofsd(s); mounts, overlay and files stay."""
        p = self.paths(rec)
        if rec.vmm is not None:
            await self.host.stop_vmm(rec, p)
            await terminate(rec.vmm)
        for h in [h for h in rec.helpers if h.marker != str(p.lower)]:
            await terminate(h)
        rec.helpers = [h for h in rec.helpers if h.marker == str(p.lower)]
        for sock in p.run.glob("*") if p.run.exists() else ():
            sock.unlink(missing_ok=True)

    async def teardown(self, rec: MachineRecord) -> None:
        """Remove everything provision made: processes, mounts, overlay, taps, files."""
        p = self.paths(rec)
        await self.stop(rec)
        await self.host.delete_nics(rec)
        if mount.is_mounted(p.rootfs):
            await asyncio.to_thread(overlay.unmount_overlay, p.rootfs)
        if mount.is_mounted(p.lower):
            await asyncio.to_thread(mount.unmount, p.lower)
        for h in rec.helpers:
            await terminate(h)
        rec.helpers = []
        if p.root.exists():
            if mount.is_mounted(p.rootfs) or mount.is_mounted(p.lower):
                raise InvalidSpec(f"refusing to delete {p.root}: a mount under it is still busy")
            await asyncio.to_thread(shutil.rmtree, p.root)
        self._log(rec).info("torn down")


def rotate(path: Path, limit: int) -> None:
    """Keep a large log at its last half: the VMM writes with O_APPEND, so truncating in
    place is safe while it runs."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= limit:
        return
    keep = tail(path, limit // 2).encode()
    rotated = path.with_suffix(path.suffix + ".1")
    shutil.copyfile(path, rotated)
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(keep)
