"""Provisioning in zos's order, and its exact inverse.

provision(): fetch the flist and detect the boot mode from its metadata; mount it
read-only, overlay with a per-VM upper dir on a loop-mounted ext4 image of RootSize() (the
root's quota; SSH host keys removed on first creation), or,
in image mode, copy its /image.raw onto a blank boot disk; write the seed, create taps,
disks and shares, then launch(): virtiofsd, then the hypervisor, each detached in its
own session. teardown() undoes all of it and is idempotent: it checks what exists, so
it also cleans up after a Deploy that failed half-way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from controller.agent.config import AgentConfig
from controller.agent.errors import (
    AgentError,
    FailedPrecondition,
    InvalidSpec,
    ProvisionFailed,
    Unavailable,
)
from controller.agent.guest import boot, confined, image, rootlayer
from controller.agent.guest import exitmarker as guestexit
from controller.agent.guest.flistmounts import FlistMounts
from controller.agent.guest.vmconfig import RUN_LOG
from controller.agent.hypervisor import ExitRecord, GuestEvent, log_tail
from controller.agent.runtime.layout import VMPaths
from controller.agent.runtime.procs import terminate
from controller.agent.runtime.state import MachineRecord, State
from controller.agent.spec import MachineSpec, Ref, Volume, VolumeKind, human_size, root_size
from controller.flist import bootmode, fetch, meta, mount, overlay
from controller.flist.meta import RunSettings

log = structlog.get_logger(__name__)

# Printed by the container-mode initramfs right before it hands over to the entrypoint.
BOOTED_MARKER = b"zm-init: switching root"
# How long a start waits for the console reader's first read (milliseconds normally).
CONSOLE_CATCH_UP_SECONDS = 1.0
BOOT_WATCH_SECONDS = 600.0  # VM-mode guests never print the marker: stop looking

# Called between provisioning steps with the fault point just passed (faults.POINTS) and
# what comes next (progress shown by Get); Machines sets it.
Checkpoint = Callable[["MachineRecord", str, str], Awaitable[None]]


async def no_checkpoint(rec: MachineRecord, point: str, progress: str) -> None:
    """The default: nothing between steps."""


class Provisioner:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = boot.HostBoot(config)
        self.flists = FlistMounts(config.state_dir, config.flist_cache)
        self.checkpoint: Checkpoint = no_checkpoint
        # For the supervisor, so that it acts at once rather than at its next round:
        # (uid, Reboot) to restart the virtiofsd(s) a reboot disconnected; (uid, None) to
        # look at the VM now (its VMM ended, the guest stopped, or it printed the boot
        # marker).
        self.guest_events: asyncio.Queue[tuple[str, GuestEvent | None]] = asyncio.Queue()

    def paths(self, rec: MachineRecord) -> VMPaths:
        return VMPaths.for_uid(self.config.state_dir, rec.ref.uid)

    def check(self, ref: Ref, spec: MachineSpec) -> None:
        """Node-specific refusals: a file:// flist must lie in a directory the operator
        allowed with --flist-dir (nothing else on the host is readable through a spec)."""
        url = urlparse(spec.flist)
        if url.scheme != "file":
            return
        path = Path(unquote(url.path)).resolve()
        if not any(path.is_relative_to(root) for root in self.config.flist_dirs):
            allowed = ", ".join(map(str, self.config.flist_dirs)) or "none (no --flist-dir)"
            raise InvalidSpec(
                f"zmachine {ref}: spec.flist {spec.flist!r} is outside the directories "
                f"allowed for file:// flists: {allowed}"
            )

    async def check_root_size(self, rec: MachineRecord, spec: MachineSpec) -> None:
        """A new generation may grow the root, never shrink it (ext4 shrinks only offline
        and only into free space; zos's quota cannot go below what is used either).
        spec.size 0 asks for "the minimum": a root already larger satisfies that."""
        p = self.paths(rec)
        if not spec.size_bytes or not p.root_image.exists():
            return
        current = await asyncio.to_thread(rootlayer.fs_size, p.root_image)
        wanted = root_size(spec)
        if wanted < current:
            raise FailedPrecondition(
                f"zmachine {rec.ref}: spec.size: root size can only grow: "
                f"{human_size(current)} -> {human_size(wanted)}"
            )

    def hypervisor_info(self) -> boot.HypervisorInfo:
        return self.host.info()

    def _log(self, rec: MachineRecord) -> structlog.stdlib.BoundLogger:
        bound: structlog.stdlib.BoundLogger = log.bind(
            zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid
        )
        return bound

    # ----------------------------------------------------------------- provision

    async def provision(self, rec: MachineRecord) -> None:
        p = self.paths(rec)
        lg = self._log(rec)
        for d in (p.root, p.run):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        step = "flist"
        try:
            flist = await asyncio.to_thread(
                fetch.fetch_flist, rec.spec.flist, self.config.flist_cache
            )
            step = "boot mode"
            info = await asyncio.to_thread(bootmode.detect_boot_mode_flist, flist)
            rec.boot_mode = info.mode.value
            if info.mode is bootmode.BootMode.IMAGE:
                await self.checkpoint(rec, "after-fetch", "copying image")
                step = "image"
                await self._image_disk(rec, flist)
                await self.checkpoint(rec, "after-image", "creating network")
            else:
                await self.checkpoint(rec, "after-fetch", "mounting flist")
                step = "flist"
                await self._flist_root(rec, flist)
                await self.checkpoint(rec, "after-mount", "creating volumes")
                step = "volumes"
                await self._volumes(rec, format_disks=True)
                await self.checkpoint(rec, "after-volumes", "creating network")
            step = "network"
            rec.nics = await self.host.create_nics(rec)
            await self.checkpoint(rec, "after-network", "writing seed")
            step = "seed"
            await self.host.write_seed(rec, p, await asyncio.to_thread(_run_settings, flist))
            await self.checkpoint(rec, "after-seed", "starting virtiofsd")
            step = "launch"
            await self.launch(rec)
        except ProvisionFailed:
            raise
        except Exception as exc:
            # The hypervisor's own errors already carry its log tail.
            typed = isinstance(exc, AgentError)
            logs = self.log_tail(rec) if step == "launch" and not typed else ""
            raise ProvisionFailed(f"zmachine {rec.ref}", step, exc, logs) from exc
        lg.info("provisioned", boot_mode=rec.boot_mode)

    async def _flist_root(self, rec: MachineRecord, flist: Path) -> None:
        """Container and VM mode: the flist under a writable overlay is the guest's root."""
        p = self.paths(rec)
        await self._mount_layer(rec)
        first = not p.upper.exists()
        for d in (p.upper, p.work, p.rootfs):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._mount_root(rec, flist)
        if first:
            # Confined: the flist's etc/ssh may be a symlink to anywhere on the host.
            dropped = confined.remove_in_root(p.rootfs, "/etc/ssh", "ssh_host_")
            self._log(rec).info("dropped the image's SSH host keys", keys=dropped)
        rec.boot_mode = bootmode.detect_boot_mode(p.rootfs).mode.value

    async def _mount_layer(self, rec: MachineRecord) -> None:
        """The root image (created, or grown to the spec's RootSize()) mounted at
        ``layer/``; skipped when mounted at the right size. Only called while the VMM is
        not running, so a mount too small can be taken down and grown."""
        p = self.paths(rec)
        size = root_size(rec.spec)
        exists = p.root_image.exists()
        small = exists and await asyncio.to_thread(rootlayer.fs_size, p.root_image) < size
        if not small and await _mounted(p.layer):
            return
        if small:
            await self._unmount_root(rec)
            self._log(rec).info("growing root", size=human_size(size))
            await asyncio.to_thread(rootlayer.grow, p.root_image, size)
        elif not exists:
            await asyncio.to_thread(rootlayer.create, p.root_image, size)
        await asyncio.to_thread(rootlayer.mount, p.root_image, p.layer)
        if p.old_upper.is_dir() and not p.upper.exists():
            self._log(rec).info("moving the writable layer into the root image")
            try:
                await asyncio.to_thread(
                    rootlayer.adopt_plain_upper, p.old_upper, p.old_work, p.upper
                )
            except Unavailable as exc:
                if "No space left" not in str(exc):
                    raise
                raise FailedPrecondition(
                    f"zmachine {rec.ref}: spec.size: the writable layer does not fit in a "
                    f"root of {human_size(size)}; deploy a larger size"
                ) from exc

    async def _image_disk(self, rec: MachineRecord, flist: Path) -> None:
        """Image mode: the volumes, raw (zos formats none of them then), and /image.raw
        copied onto the boot disk if it is blank. The flist is mounted only for the copy:
        the guest never sees it (no virtio-fs root), so a running VM holds no mount."""
        index = image.boot_disk(rec.spec)
        self.host.driver.require_disk_boot()
        await self._volumes(rec, format_disks=False)
        p = self.paths(rec)
        vol = rec.spec.volumes[index]
        disk = p.volume(vol.name, disk=True)
        if not await asyncio.to_thread(image.is_blank, disk):
            self._log(rec).info("boot disk in use, image not copied", disk=vol.name)
            return
        lower = await self._acquire_flist(rec, flist)
        try:
            src = bootmode.detect_boot_mode(lower).image
            if src is None:
                raise Unavailable(f"{lower}: the mounted flist has no /image.raw")
            what = f"spec.volumes[{index}] ({vol.name!r}, the boot disk)"

            def shown(percent: int) -> None:  # Get shows it while Provisioning
                rec.message = f"copying image {percent}%"

            await asyncio.to_thread(image.write_image, src, disk, vol.size_bytes, what, shown)
        finally:
            await self._release_flist(rec)  # only for the copy: a running VM holds none

    async def _acquire_flist(self, rec: MachineRecord, flist: Path) -> Path:
        """The node's shared mount of ``flist``, named in the record (saved at the next
        checkpoint) so that an agent restart counts this VM as its user."""
        key = self.flists.key(flist)
        if rec.flist_mount and rec.flist_mount != key:
            await self._release_flist(rec)
        try:
            lower = await self.flists.acquire(rec.ref.uid, flist)
        except Exception as exc:
            log_file = self.flists.path(key).parent / "mount.log"
            raise ProvisionFailed(
                f"zmachine {rec.ref}", "flist mount", exc, log_tail(log_file)
            ) from exc
        rec.flist_mount = key
        return lower

    async def _release_flist(self, rec: MachineRecord) -> None:
        if rec.flist_mount:
            await self.flists.release(rec.ref.uid, rec.flist_mount)
            rec.flist_mount = ""

    def claim_flist(self, rec: MachineRecord) -> None:
        """After a restart, before anything runs: this record's VM uses its mount."""
        if rec.flist_mount:
            self.flists.adopt(rec.ref.uid, rec.flist_mount)

    async def _volumes(self, rec: MachineRecord, format_disks: bool) -> None:
        """Share directories, and disks as sparse files, formatted ext4 when new if
        ``format_disks`` (the guest mounts them by fstab entry; a blank device would fail
        that mount). Image mode leaves them blank: the guest's OS owns them."""
        p = self.paths(rec)
        for v in rec.spec.volumes:
            path = p.volume(v.name, v.kind is VolumeKind.DISK)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if v.kind is VolumeKind.SHARE:
                path.mkdir(exist_ok=True, mode=0o755)
                await self._mount_share(rec, v)
            elif not path.exists():
                tmp = path.with_suffix(".new")
                tmp.touch(mode=0o600)
                os.truncate(tmp, v.size_bytes)  # sparse
                if format_disks:
                    await _run(["mkfs.ext4", "-q", "-F", "-L", v.name[:16], str(tmp)])
                tmp.rename(path)

    async def _mount_share(self, rec: MachineRecord, v: Volume) -> None:
        """A share with a size is a loop-mounted sparse ext4 image of that size (as the
        root is), so a guest filling it gets ENOSPC instead of filling the node's disk;
        grown offline to a larger size. Size 0: a plain directory, unlimited."""
        if not v.size_bytes:
            return
        p = self.paths(rec)
        path, image = p.volume(v.name, disk=False), p.share_image(v.name)
        if image.exists():
            current = await asyncio.to_thread(rootlayer.fs_size, image)
            if current >= v.size_bytes and await _mounted(path):
                return
            await asyncio.to_thread(rootlayer.unmount, image, path)
            if current < v.size_bytes:
                self._log(rec).info("growing share", volume=v.name, size=human_size(v.size_bytes))
                await asyncio.to_thread(rootlayer.grow, image, v.size_bytes)
        else:
            await asyncio.to_thread(rootlayer.create, image, v.size_bytes)
        await asyncio.to_thread(rootlayer.mount, image, path)

    async def _unmount_shares(self, rec: MachineRecord) -> None:
        p = self.paths(rec)
        for v in rec.spec.volumes:
            if v.kind is VolumeKind.SHARE and p.share_image(v.name).exists():
                await asyncio.to_thread(
                    rootlayer.unmount, p.share_image(v.name), p.volume(v.name, disk=False)
                )

    async def check_share_sizes(self, rec: MachineRecord, spec: MachineSpec) -> None:
        """Shares grow, never shrink (as the root): refused naming the volume's field."""
        p = self.paths(rec)
        for i, v in enumerate(spec.volumes):
            image = p.share_image(v.name)
            if v.kind is not VolumeKind.SHARE or not v.size_bytes or not image.exists():
                continue
            current = await asyncio.to_thread(rootlayer.fs_size, image)
            if v.size_bytes < current:
                raise FailedPrecondition(
                    f"zmachine {rec.ref}: spec.volumes[{i}].size ({v.name!r}): a share can "
                    f"only grow: {human_size(current)} -> {human_size(v.size_bytes)}"
                )

    async def launch(self, rec: MachineRecord) -> None:
        """Start virtiofsd(s) and the VMM; used by provision and by every restart."""
        p = self.paths(rec)
        rec.helpers = [h for h in rec.helpers if h.marker == str(p.lower)]
        await self.host.ensure_taps(rec)
        rec.helpers += await self.host.start_shares(rec, p)
        await self.checkpoint(rec, "after-virtiofsd", "starting the VMM")
        rec.started_at = time.time()
        rec.boot_duration = 0.0
        rec.boot_nonce = guestexit.new_nonce()
        rec.vmm = await self.host.start_vmm(rec, p)
        self._watch(rec)
        await self.checkpoint(rec, "after-vmm", "VMM started")
        rec.hypervisor = self.host.info().name
        # Paused before the state says so: a Get between the two must never see a
        # paused spec reported as Running.
        if rec.spec.paused:
            await self.checkpoint(rec, "pausing", "pausing the VM")
            await self.host.pause(rec, p)
        rec.state = State.PAUSED if rec.spec.paused else State.RUNNING
        rec.reason, rec.message, rec.log_tail = "", "", ""

    # ----------------------------------------------------------------- runtime

    async def pause(self, rec: MachineRecord) -> None:
        await self.host.pause(rec, self.paths(rec))
        rec.state = State.PAUSED

    async def resume(self, rec: MachineRecord) -> None:
        await self.host.resume(rec, self.paths(rec))
        rec.state = State.RUNNING

    async def adopt(self, rec: MachineRecord) -> None:
        """After an agent restart: keep a live VMM as it is; otherwise re-make the mounts
        and let the supervisor apply the restart policy to the dead VMM.

        A VMM started just before the last agent died may be newer than the record: the
        driver's pid file finds it, so it is adopted rather than started a second time.
        """
        lg = self._log(rec)
        found = None if rec.vmm is not None and rec.vmm.alive() else self.host.find_vmm(rec)
        if found is not None:
            rec.vmm = found
        if rec.vmm is not None and rec.vmm.alive():
            lg.info("adopted running vm", pid=rec.vmm.pid)
            self._watch(rec)
            return
        if rec.state in (State.RUNNING, State.PAUSED):
            lg.warning("vm not running after agent restart")
            await self._mount_root(rec)
            await self._volumes(rec, format_disks=rec.boot_mode != bootmode.BootMode.IMAGE.value)
            rec.state = State.RUNNING  # the supervisor sees the dead VMM and applies policy

    async def _mount_root(self, rec: MachineRecord, flist: Path | None = None) -> None:
        """The flist (FUSE, read-only) and the overlay on it; skips what is mounted.
        Image mode has no root to mount: the VM boots from its disk."""
        p = self.paths(rec)
        if rec.boot_mode == bootmode.BootMode.IMAGE.value:
            return
        lower = self.flists.path(rec.flist_mount) if rec.flist_mount else None
        if lower is None or not await _mounted(lower):
            if flist is None:
                flist = await asyncio.to_thread(
                    fetch.fetch_flist, rec.spec.flist, self.config.flist_cache
                )
            lower = await self._acquire_flist(rec, flist)
        await self._mount_layer(rec)  # before the overlay: upper and work live in it
        if not await _mounted(p.rootfs):
            await asyncio.to_thread(overlay.mount_overlay, lower, p.upper, p.work, p.rootfs)

    async def _unmount_root(self, rec: MachineRecord) -> None:
        """The overlay, then the root image under it; the flist mount stays."""
        p = self.paths(rec)
        if await _mounted(p.rootfs):
            await asyncio.to_thread(overlay.unmount_overlay, p.rootfs)
        await asyncio.to_thread(rootlayer.unmount, p.root_image, p.layer)

    def _watch(self, rec: MachineRecord) -> None:
        uid = rec.ref.uid

        def on_event(event: GuestEvent | None) -> None:
            if event is None:  # the VMM is gone
                self.guest_events.put_nowait((uid, None))
                return
            self._log(rec).info("guest event", guest_event=event.value)
            if event is not GuestEvent.REBOOT:
                self.guest_events.put_nowait((uid, None))
            elif self.host.driver.reboot_reconnects_shares:
                self.guest_events.put_nowait((uid, event))

        def on_output(data: bytes) -> None:
            # A marker split across two reads is found by the supervisor's next round.
            if not rec.boot_duration and BOOTED_MARKER in data:
                self.guest_events.put_nowait((uid, None))

        self.host.watch(rec, self.paths(rec), on_event, on_output)

    async def restart_dead_shares(self, rec: MachineRecord, wait: float = 0.0) -> bool:
        """virtiofsd again for shares whose daemon exited under a running VMM (a guest
        reboot under cloud-hypervisor); True when the record changed."""
        return await self.host.restart_dead_shares(rec, self.paths(rec), wait)

    async def guest_exit(self, rec: MachineRecord) -> ExitRecord | None:
        """None while the guest runs; else why it ended (see hypervisor.GuestExit)."""
        return await self.host.guest_exit(rec, self.paths(rec))

    async def observe_started(self, rec: MachineRecord) -> None:
        """Right after a start: a guest that booted before its console was first read
        (a fast boot) is recorded booted now, and reported with the start."""
        await self.host.console_caught_up(rec, CONSOLE_CATCH_UP_SECONDS)
        self.observe(rec)

    def observe(self, rec: MachineRecord) -> bool:
        """Periodic bookkeeping of a live VM: boot duration and VMM log rotation (the
        console stream rotates console.log itself).
        True when the record changed (the boot finished just now)."""
        p = self.paths(rec)
        booted = False
        if not rec.boot_duration and time.time() - rec.started_at < BOOT_WATCH_SECONDS:
            try:
                data = p.console_log.read_bytes()
            except OSError:
                data = b""
            if BOOTED_MARKER in data:
                rec.boot_duration = time.time() - rec.started_at
                booted = True
        rotate(p.vmm_log, self.config.log_rotate_bytes)
        return booted

    def console_tail(self, rec: MachineRecord, nbytes: int) -> bytes:
        """The last ``nbytes`` of the serial console log (whoever writes it: the VMM, or
        the agent's console bridge)."""
        path = self.paths(rec).console_log
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
                return f.read()
        except OSError:
            return b""

    def entrypoint_exit(self, rec: MachineRecord) -> guestexit.EntrypointExit | None:
        """How the container entrypoint of the last VMM start ended, if our init said so."""
        return guestexit.find_exit(self.console_tail(rec, guestexit.TAIL_BYTES), rec.boot_nonce)

    def log_tail(self, rec: MachineRecord) -> str:
        """The end of the serial console and of the VMM's own log, for FAILED reports."""
        p = self.paths(rec)
        tail = f"[console]\n{log_tail(p.console_log)}\n[vmm]\n{log_tail(p.vmm_log, 1024)}"
        run_log = p.root / RUN_LOG  # cloud-hypervisor's own log (--log-file)
        if run_log.exists():
            tail += f"\n[{RUN_LOG}]\n{log_tail(run_log, 1024)}"
        return tail

    async def stats(self, rec: MachineRecord) -> boot.VMStats:
        return await self.host.stats(rec, self.paths(rec))

    # ----------------------------------------------------------------- teardown

    async def stop(self, rec: MachineRecord, forget_console: bool = False) -> None:
        """Stop the VMM and the virtiofsd(s); mounts, overlay and files stay."""
        p = self.paths(rec)
        if rec.vmm is not None:
            await self.host.stop_vmm(rec, p)
            await terminate(rec.vmm)
        await self.host.unwatch(rec, forget=forget_console)
        for h in [h for h in rec.helpers if h.marker != str(p.lower)]:
            await terminate(h)
        rec.helpers = [h for h in rec.helpers if h.marker == str(p.lower)]
        # Sockets only: a *.lock is the VMM's own guard (see Hypervisor.clear_stale_socket).
        for sock in p.run.glob("*.sock*") if p.run.exists() else ():
            sock.unlink(missing_ok=True)

    async def teardown(self, rec: MachineRecord, keep_data: bool) -> None:
        """Undo provision: processes, taps, overlay and flist mounts, sockets, seed.

        ``keep_data=False`` (Delete, failed first Deploy) also removes the writable layer,
        volumes and logs: the VM's whole directory. ``keep_data=True`` (re-provisioning
        for a new generation) keeps the writable layer, volumes and logs.
        """
        p = self.paths(rec)
        await self.stop(rec, forget_console=not keep_data)
        await self.host.delete_nics(rec)
        rec.nics = []
        await self._unmount_root(rec)
        await self._unmount_shares(rec)
        await self._release_flist(rec)
        if await _mounted(p.lower):  # a VM provisioned by an agent before shared mounts
            await asyncio.to_thread(mount.unmount, p.lower)
        for h in rec.helpers:
            await terminate(h)
        rec.helpers = []
        shares = [p.volume(v.name, disk=False) for v in rec.spec.volumes]
        if await _mounted(p.rootfs, p.lower, p.layer, *shares):
            raise Unavailable(f"zmachine {rec.ref}: {p.root} still has a busy mount; retry")
        if not keep_data:
            if p.root.exists():
                await asyncio.to_thread(shutil.rmtree, p.root)
        else:
            p.seed.unlink(missing_ok=True)
        self._log(rec).info("torn down", keep_data=keep_data)


async def _mounted(*paths: Path) -> bool:
    """Whether any of ``paths`` is a mount point. One read of the mount table, in a thread:
    with a few hundred mounts on a loaded host a read takes tens of milliseconds, and a
    burst of deletions reading it on the event loop stalled the agent's RPCs."""
    return await asyncio.to_thread(mount.any_mounted, paths)


def rotate(path: Path, limit: int) -> None:
    """Keep a large log at its last half: the VMM writes with O_APPEND, so truncating in
    place is safe while it runs."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= limit:
        return
    with open(path, "rb") as f:
        f.seek(size - limit // 2)
        keep = f.read()
    rotated = path.with_suffix(path.suffix + ".1")
    shutil.copyfile(path, rotated)
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(keep)


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise Unavailable(f"{argv[0]} failed ({proc.returncode}): {out.decode(errors='replace')}")


def _run_settings(flist: Path) -> RunSettings:
    with meta.open_flist(flist) as opened:
        return opened.run_settings()
