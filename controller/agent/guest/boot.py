"""Glue between a MachineRecord and the guest-boot building blocks (seed, virtiofs,
network, hypervisor drivers): what the agent asks of them, in its own terms."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.agent import hypervisor
from controller.agent.config import AgentConfig
from controller.agent.errors import AgentError, FailedPrecondition, InvalidSpec
from controller.agent.guest import image, seed, virtiofs, vmconfig
from controller.agent.hypervisor.qemu import QemuVM
from controller.agent.network import addressing, mycelium, wireguard
from controller.agent.network import local as network
from controller.agent.network.private import PrivateNetworks
from controller.agent.network.public import PublicBridge
from controller.agent.network.yggdrasil import ROUTED, Planetary, guest_address
from controller.agent.runtime.console import ConsoleStream
from controller.agent.runtime.layout import VMPaths
from controller.agent.runtime.procs import ProcessRef, terminate
from controller.agent.runtime.state import MachineRecord, NicStatus
from controller.agent.spec import (
    MYCELIUM_NETWORK,
    PLANETARY_NETWORK,
    PUBLIC_NETWORK,
    Interface,
    VolumeKind,
    hostname_label,
)
from controller.flist.meta import RunSettings

log = structlog.get_logger(__name__)

NAMESERVERS = ("8.8.8.8", "1.1.1.1")
PUBLIC_TAP = "p"
PLANETARY_TAP = "y"
MYCELIUM_TAP = "m"
WATCH_DRAIN_SECONDS = 2.0  # for a watch to read the last output of a stopped VMM


@dataclass(frozen=True)
class HypervisorInfo:
    name: str
    version: str
    accelerated: bool


@dataclass(frozen=True)
class VMStats:
    vcpu_seconds: float = 0.0
    vmm_rss_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    block_read_bytes: int = 0
    block_write_bytes: int = 0


class HostBoot:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.ipam = network.IPAllocator(config.cidr, config.state_dir / "ipam.json")
        self.wireguard_go = network.find_binary("wireguard-go", config.wireguard_go)
        self.wireguard_key = wireguard.node_key(config.state_dir / "wireguard.key")
        self.private = PrivateNetworks(
            config.node_name, config.state_dir, config.netns, self.wireguard_go,
            self.wireguard_key, network.find_binary("mycelium", config.mycelium),
        )  # fmt: skip
        self.public = PublicBridge(config.netns, config.public_interface)
        self.planetary = Planetary(
            config.netns, config.state_dir, network.find_binary("yggdrasil", config.yggdrasil),
            config.underlay_address,
        )  # fmt: skip
        self.driver = hypervisor.select_hypervisor(
            config.hypervisor,
            config.accel,
            config.guest_kernel_dir,
            config.firmware,
            config.vmm_binary,
        )
        # Per uid: the console stream (kept across VMM restarts, so its history and
        # subscribers carry over) and the task following the current VMM.
        self.consoles: dict[str, ConsoleStream] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self.virtiofsd = virtiofs.find_virtiofsd(config.virtiofsd)

    def info(self) -> HypervisorInfo:
        return HypervisorInfo(
            self.driver.name, self.driver.version(), self.driver.acceleration() == "kvm"
        )

    # ----------------------------------------------------------------- network

    def overlay_identity(self) -> dict[str, str]:
        """What other nodes need to peer with this one; empty without an overlay."""
        if self.wireguard_go is None or not self.config.underlay_address:
            return {}
        return {
            "wireguard_public_key": wireguard.public_key(self.wireguard_key),
            "underlay_address": self.config.underlay_address,
        }

    def _ipam(self, nic: Interface) -> network.IPAllocator:
        return self.private.ipam(nic) if nic.subnet else self.ipam

    async def _bridge(self, nic: Interface) -> str:
        """The bridge the interface's tap joins, the network set up first when private."""
        if not nic.subnet:
            return self.config.bridge
        await asyncio.to_thread(self.private.ensure, nic)
        return self.private.bridge_of(nic)

    async def create_nics(self, rec: MachineRecord) -> list[NicStatus]:
        nics = []
        for i, nic in enumerate(rec.spec.interfaces):
            ipam = self._ipam(nic)
            try:
                ip = ipam.reserve(rec.ref.uid, nic.ip) if nic.ip else ipam.allocate(rec.ref.uid)
            except ValueError as exc:
                raise InvalidSpec(
                    f"zmachine {rec.ref}: spec.network.interfaces[{i}].ip: {exc}"
                ) from exc
            bridge = await self._bridge(nic)
            tap = network.tap_name(rec.ref.uid, i)
            await asyncio.to_thread(network.create_tap, tap, bridge, self.config.netns)
            ipv6 = ""
            if nic.ipv6_subnet:
                v6 = ipaddress.IPv6Network(nic.ipv6_subnet)
                ipv6 = str(v6.network_address + ip.packed[3])
            mac = network.mac_address(rec.ref.uid, i)
            nics.append(NicStatus(nic.network, str(ip), mac, tap, ipv6))
        if (pub := rec.spec.public) is not None:
            # After the private NIC, as zos orders them; the MAC as zos derives it.
            tap = network.tap_name(rec.ref.uid, 0, PUBLIC_TAP)
            await asyncio.to_thread(self.public.attach, tap, f"zmachine {rec.ref}")
            ipv4, ipv6 = (
                str(ipaddress.ip_interface(c).ip) if c else "" for c in (pub.ipv4, pub.ipv6)
            )
            nics.append(NicStatus(PUBLIC_NETWORK, ipv4, network.zos_mac(tap), tap, ipv6))
        if rec.spec.planetary:
            tap = network.tap_name(rec.ref.uid, 0, PLANETARY_TAP)
            subnet = await asyncio.to_thread(self.planetary.attach, tap, f"zmachine {rec.ref}")
            mac = network.zos_mac(f"ygg:{tap}")
            address = str(guest_address(subnet, mac))
            nics.append(NicStatus(PLANETARY_NETWORK, "", mac, tap, address))
        if rec.spec.mycelium_seed:
            nics.append(await self._mycelium_nic(rec))
        return nics

    async def _mycelium_nic(self, rec: MachineRecord) -> NicStatus:
        """Last, as zos orders NICs: on the mycelium router of the private NIC's network."""
        nic = next(n for n in rec.spec.interfaces if n.subnet)  # validate_spec: one is
        tap = network.tap_name(rec.ref.uid, 0, MYCELIUM_TAP)
        subnet = await asyncio.to_thread(
            self.private.attach_mycelium, nic, tap, f"zmachine {rec.ref}: spec.network.mycelium"
        )
        address = mycelium.guest_address(subnet, bytes.fromhex(rec.spec.mycelium_seed))
        mac = network.zos_mac(f"mycelium:{tap}")
        return NicStatus(MYCELIUM_NETWORK, "", mac, tap, str(address))

    async def ensure_taps(self, rec: MachineRecord) -> None:
        for nic, n in zip(rec.spec.interfaces, rec.nics, strict=False):
            bridge = await self._bridge(nic)
            await asyncio.to_thread(network.create_tap, n.tap, bridge, self.config.netns)
        for n in rec.nics:
            if n.network == PUBLIC_NETWORK:
                await asyncio.to_thread(self.public.attach, n.tap, f"zmachine {rec.ref}")
            elif n.network == PLANETARY_NETWORK:
                await asyncio.to_thread(self.planetary.attach, n.tap, f"zmachine {rec.ref}")
            elif n.network == MYCELIUM_NETWORK:
                await self._mycelium_nic(rec)

    async def delete_nics(self, rec: MachineRecord) -> None:
        # Recorded taps, plus the names a half-finished create_nics may have made.
        public = network.tap_name(rec.ref.uid, 0, PUBLIC_TAP)
        planetary = network.tap_name(rec.ref.uid, 0, PLANETARY_TAP)
        taps = {n.tap for n in rec.nics} - {public, planetary}
        taps |= {network.tap_name(rec.ref.uid, i) for i in range(len(rec.spec.interfaces))}
        taps.add(network.tap_name(rec.ref.uid, 0, MYCELIUM_TAP))
        for tap in sorted(taps):
            await asyncio.to_thread(network.delete_tap, tap, self.config.netns)
        await asyncio.to_thread(self.public.detach, public)
        await asyncio.to_thread(self.planetary.detach, planetary)
        self.ipam.release(rec.ref.uid)
        for nic in rec.spec.interfaces:
            if nic.subnet:
                self.private.ipam(nic).release(rec.ref.uid)
                await asyncio.to_thread(self.private.remove_if_unused, nic)

    # ----------------------------------------------------------------- seed

    async def write_seed(
        self, rec: MachineRecord, p: VMPaths, settings: RunSettings | None = None
    ) -> None:
        """Image mode (as zos) carries no mounts, env or entrypoint: the image's own OS
        mounts its disks and runs its own init; hostname, network and keys still apply.
        Container mode takes the entrypoint an image's flist names when the spec has none,
        the image's env under the spec's and the image's working directory (as a container
        runtime does: also for an entrypoint the spec gives)."""
        image_mode = rec.boot_mode == vmconfig.BootMode.IMAGE
        entrypoint, env = rec.spec.entrypoint, dict(rec.spec.env)
        workdir = "/"
        if settings is not None and rec.boot_mode == vmconfig.BootMode.CONTAINER:
            entrypoint = entrypoint or settings.entrypoint
            env = {**settings.env, **env}
            workdir = "/" + settings.workdir.lstrip("/")  # Docker: relative to the root
        disks = [v for v in rec.spec.volumes if v.kind is VolumeKind.DISK]
        mounts = []
        for m in () if image_mode else rec.spec.mounts:
            vol = next(v for v in rec.spec.volumes if v.name == m.name)
            if vol.kind is VolumeKind.DISK:
                # Disks follow the order of spec.volumes: vda, vdb, ... (the seed is last).
                dev = "vd" + chr(ord("a") + disks.index(vol))
                mounts.append(seed.Mount(dev, m.mountpoint))
            else:
                mounts.append(seed.Mount(vol.name, m.mountpoint, fstype="virtiofs"))
        interfaces = seed_interfaces(rec, self.ipam)
        config = seed.SeedConfig(
            instance_id=rec.ref.uid,
            hostname=rec.spec.hostname or hostname_label(rec.ref.name),
            interfaces=interfaces,
            nameservers=NAMESERVERS if interfaces else (),
            ssh_keys=rec.spec.ssh_keys,
            mounts=mounts,
            env={} if image_mode else env,
            entrypoint="" if image_mode else entrypoint,
            workdir=workdir,
        )
        await asyncio.to_thread(seed.write_seed, config, p.seed)

    # ----------------------------------------------------------------- processes

    def vm_config(self, rec: MachineRecord, p: VMPaths) -> vmconfig.VMConfig:
        shares: list[vmconfig.FsShare] = []
        disks: list[vmconfig.Disk] = []
        for v in rec.spec.volumes:
            path = p.volume(v.name, v.kind is VolumeKind.DISK)
            if v.kind is VolumeKind.DISK:
                disks.append(vmconfig.Disk(path))
            else:
                shares.append(vmconfig.FsShare(v.name, p.share_socket(len(shares)), path))
        if rec.boot_mode == vmconfig.BootMode.IMAGE:
            # No kernel and no virtio-fs root: the firmware boots the boot disk, first.
            disks.insert(0, disks.pop(_disk_index(rec, image.boot_disk(rec.spec))))
            kernel, initrd, cmdline = None, None, ""
        else:
            assets = vmconfig.detect_boot(p.rootfs, self._guest_dir())
            shares.insert(0, vmconfig.FsShare(vmconfig.ROOT_TAG, p.root_share_socket, p.rootfs))
            kernel, initrd = assets.kernel, assets.initrd
            cmdline = vmconfig.kernel_cmdline(
                assets.mode, rec.spec.entrypoint, nonce=rec.boot_nonce
            )
        disks.append(vmconfig.Disk(p.seed, readonly=True))
        return vmconfig.VMConfig(
            vm_id=rec.ref.uid,
            cpus=rec.spec.cpu,
            memory_mib=rec.spec.memory_bytes >> 20,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            shares=shares,
            disks=disks,
            nics=[vmconfig.Nic(n.tap, n.mac) for n in rec.nics],
            serial_log=p.console_log,
            api_socket=p.run / "vmm.sock",
            state_dir=p.root,
            netns=self.config.netns,
            serial_pty=True,  # the agent writes console.log from the PTY (console.py)
        )

    def _guest_dir(self) -> Path:
        if self.config.guest_kernel_dir is None:
            return self.config.state_dir / "guest"  # detect_boot names what is missing
        return self.config.guest_kernel_dir

    async def start_shares(self, rec: MachineRecord, p: VMPaths) -> list[ProcessRef]:
        """All or nothing: when one share fails, the daemons already started are stopped
        (the caller never learns their refs, so nothing else could)."""
        refs: list[ProcessRef] = []
        try:
            for share in self.vm_config(rec, p).shares:
                refs.append(await self._start_share(share, p))
        except BaseException:
            for ref in refs:
                await terminate(ref)
            raise
        return refs

    async def start_vmm(self, rec: MachineRecord, p: VMPaths) -> ProcessRef:
        cfg = self.vm_config(rec, p)
        stray = self.driver.adopt(cfg)
        if stray is not None:
            # A VMM the record does not know (the agent died right after starting it):
            # never run two VMs for one Zmachine.
            await stray.stop(grace=2.0, hard_grace=3.0)
        vm = await self.driver.start(cfg)
        return vm.ref

    def console(self, rec: MachineRecord, p: VMPaths) -> ConsoleStream:
        stream = self.consoles.get(rec.ref.uid)
        if stream is None:
            stream = ConsoleStream(
                p.console_log, self.config.log_rotate_bytes, self.config.console_log_keep
            )
            self.consoles[rec.ref.uid] = stream
        return stream

    def watch(
        self,
        rec: MachineRecord,
        p: VMPaths,
        on_event: Callable[[hypervisor.GuestEvent | None], None],
        on_output: Callable[[bytes], None],
    ) -> None:
        """Follow the VM's running VMM: serial console into its stream (each chunk also
        to ``on_output``), guest events to ``on_event``, then ``None`` to it once the
        VMM is gone. Ends by itself when the VMM is gone."""
        if rec.vmm is None:
            return
        self._cancel_watch(rec.ref.uid)
        vm = self.driver.attach(self.vm_config(rec, p), rec.vmm)
        bound = log.bind(zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid)
        console = self.console(rec, p)
        console.open_log()  # console.log exists once the VMM runs, output or not
        console.on_output = on_output
        console.caught_up.clear()
        task = asyncio.create_task(_follow(vm, console, on_event, bound))
        task.add_done_callback(lambda _: on_event(None))
        self._watches[rec.ref.uid] = task

    async def console_caught_up(self, rec: MachineRecord, within: float) -> None:
        """Wait (at most ``within`` seconds) until the VM's console reader has logged what the
        VMM wrote before the reader opened its PTY."""
        stream = self.consoles.get(rec.ref.uid)
        if stream is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.caught_up.wait(), within)

    async def unwatch(self, rec: MachineRecord, forget: bool) -> None:
        """After the VMM stopped: let the watch read what is left, then end it.
        ``forget`` (Delete) also drops the console stream."""
        task = self._watches.pop(rec.ref.uid, None)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), WATCH_DRAIN_SECONDS)
            except TimeoutError:
                task.cancel()
            except asyncio.CancelledError:
                # A watch that ended cancelled is over; it must not cancel this caller (a
                # Delete would answer CANCELLED). Only our own cancellation goes on.
                if not task.cancelled():
                    raise
        if forget and (stream := self.consoles.pop(rec.ref.uid, None)) is not None:
            stream.close()

    def _cancel_watch(self, uid: str) -> None:
        task = self._watches.pop(uid, None)
        if task is not None:
            task.cancel()

    def find_vmm(self, rec: MachineRecord) -> ProcessRef | None:
        """The VM's running VMM per the driver's pid file, if any."""
        p = VMPaths.for_uid(self.config.state_dir, rec.ref.uid)
        try:
            vm = self.driver.adopt(self.vm_config(rec, p))
        except AgentError:  # e.g. the root is not mounted: then no VMM can be running
            return None
        return vm.ref if vm is not None else None

    def _vm(self, rec: MachineRecord, p: VMPaths) -> hypervisor.VM:
        if rec.vmm is None or not rec.vmm.alive():
            raise FailedPrecondition(f"zmachine {rec.ref} is {rec.state}: its VMM is not running")
        return self.driver.attach(self.vm_config(rec, p), rec.vmm)

    async def stop_vmm(self, rec: MachineRecord, p: VMPaths) -> None:
        # Short graces: a container entrypoint as PID 1 usually ignores the power button.
        if rec.vmm is not None and rec.vmm.alive():
            await self._vm(rec, p).stop(grace=2.0, hard_grace=3.0)

    async def guest_exit(self, rec: MachineRecord, p: VMPaths) -> hypervisor.ExitRecord | None:
        """None while the guest runs; else why it ended (ends a powered-off VMM)."""
        if rec.vmm is None:
            return None
        return await self.driver.attach(self.vm_config(rec, p), rec.vmm).guest_exit()

    async def restart_dead_shares(self, rec: MachineRecord, p: VMPaths, wait: float) -> bool:
        """A new virtiofsd for every share whose daemon is gone; True if any was started.

        virtiofsd serves one connection and exits when it drops, which a guest reboot
        under cloud-hypervisor does (it re-creates the devices, then reconnects for up to
        60 s before giving up). ``wait``: seconds to let a daemon that is about to exit
        (a reboot just began) do so first; under QEMU it keeps running and is kept.
        """
        started = False
        for share in self.vm_config(rec, p).shares:
            current = [h for h in rec.helpers if h.marker == str(share.socket)]
            deadline = asyncio.get_running_loop().time() + wait
            while any(map(hypervisor.still_running, current)):
                if asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.05)
            if any(map(hypervisor.still_running, current)):
                continue
            ref = await self._start_share(share, p)
            rec.helpers = [h for h in rec.helpers if h.marker != str(share.socket)] + [ref]
            started = True
        return started

    async def _start_share(self, share: vmconfig.FsShare, p: VMPaths) -> ProcessRef:
        log_path = p.root / f"virtiofsd-{share.tag}.log"
        return await virtiofs.start_virtiofsd(share, log_path, daemon=self.virtiofsd)

    async def pause(self, rec: MachineRecord, p: VMPaths) -> None:
        await self._vm(rec, p).pause()

    async def resume(self, rec: MachineRecord, p: VMPaths) -> None:
        await self._vm(rec, p).resume()

    async def stats(self, rec: MachineRecord, p: VMPaths) -> VMStats:
        vm = self._vm(rec, p)
        s = await vm.stats()
        read = written = 0
        if isinstance(vm, QemuVM):
            for dev in await vm.qmp.execute("query-blockstats"):
                read += int(dev.get("stats", {}).get("rd_bytes", 0))
                written += int(dev.get("stats", {}).get("wr_bytes", 0))
        else:
            for counters in s.counters.values():
                read += counters.get("read_bytes", 0)
                written += counters.get("write_bytes", 0)
        rx = tx = 0
        for n in rec.nics:
            # The tap's transmit is the guest's receive.
            tap_rx, tap_tx = await asyncio.to_thread(_link_bytes, n.tap, self.config.netns)
            rx, tx = rx + tap_tx, tx + tap_rx
        return VMStats(s.cpu_seconds, s.rss_bytes, rx, tx, read, written)


async def _follow(
    vm: hypervisor.VM,
    console: ConsoleStream,
    on_event: Callable[[hypervisor.GuestEvent], None],
    bound: structlog.stdlib.BoundLogger,
) -> None:
    async def events() -> None:
        try:
            await vm.follow_events(on_event)
        except hypervisor.HypervisorError as exc:
            bound.warning("cannot follow VMM events", error=str(exc))

    try:
        await asyncio.gather(console.follow(vm), events())
    except Exception:
        bound.exception("following the VM failed")


def _link_bytes(name: str, netns: str | None) -> tuple[int, int]:
    """(rx, tx) byte counters of a link, read with iproute2 so a netns needs no setns."""
    argv = ["ip", *(["-n", netns] if netns else []), "-s", "-j", "link", "show", "dev", name]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if out.returncode != 0:
        return 0, 0
    stats = json.loads(out.stdout)[0].get("stats64", {})
    return int(stats.get("rx", {}).get("bytes", 0)), int(stats.get("tx", {}).get("bytes", 0))


def seed_interfaces(rec: MachineRecord, local: network.IPAllocator) -> list[seed.Interface]:
    """Private NICs, the public one, then planetary and mycelium, in zos's order. As zos: a
    family the public NIC has gets its default route there only; else the private NIC keeps
    its gateway."""
    out = [
        _seed_interface(nic, n, local)
        for nic, n in zip(rec.spec.interfaces, rec.nics, strict=False)
    ]
    overlays = [
        _overlay_seed(n, ROUTED if n.network == PLANETARY_NETWORK else mycelium.ROUTED)
        for n in rec.nics
        if n.network in (PLANETARY_NETWORK, MYCELIUM_NETWORK)
    ]
    pub = rec.spec.public
    nic = next((n for n in rec.nics if n.network == PUBLIC_NETWORK), None)
    if pub is None or nic is None:
        return out + overlays
    out = [
        dataclasses.replace(
            i,
            gateway4=None if pub.ipv4 else i.gateway4,
            gateway6=None if pub.ipv6 else i.gateway6,
        )
        for i in out
    ]
    out.append(
        seed.Interface(
            mac=nic.mac,
            addresses=[c for c in (pub.ipv4, pub.ipv6) if c],
            gateway4=pub.gateway4 or None,
            gateway6=pub.gateway6 or None,
        )
    )
    return out + overlays


def _overlay_seed(nic: NicStatus, routed: ipaddress.IPv6Network) -> seed.Interface:
    """A planetary or mycelium NIC as zos configures it: its address in the router's /64,
    and the overlay's range (200::/7, 400::/7) via the /64's ::1."""
    v6 = ipaddress.IPv6Interface(f"{nic.ipv6}/64")
    gateway = str(v6.network.network_address + 1)
    return seed.Interface(
        mac=nic.mac, addresses=[str(v6)], routes=[seed.Route(str(routed), gateway)]
    )


def _seed_interface(nic: Interface, n: NicStatus, local: network.IPAllocator) -> seed.Interface:
    """As zos configures a private NIC: the /24 and the /64, gateways .1 and ::1, and the
    whole range and 100.64.0.0/16 (the overlay's addresses) via .1."""
    if not nic.subnet:
        address = local.interface(ipaddress.IPv4Address(n.ip))
        return seed.Interface(mac=n.mac, addresses=[str(address)], gateway4=str(local.gateway))
    subnet = ipaddress.IPv4Network(nic.subnet)
    v6 = ipaddress.IPv6Network(nic.ipv6_subnet)
    gw = str(addressing.gateway(subnet))
    return seed.Interface(
        mac=n.mac,
        addresses=[f"{n.ip}/{subnet.prefixlen}", f"{n.ipv6}/{v6.prefixlen}"],
        gateway4=gw,
        gateway6=str(v6.network_address + 1),
        routes=[
            seed.Route(nic.ip_range, gw),
            seed.Route(str(addressing.ACCESS_RANGE), gw),
        ],
    )


def _disk_index(rec: MachineRecord, volume_index: int) -> int:
    """Position among the disks (volumes of kind disk, in order) of spec.volumes[i]."""
    kinds = [v.kind for v in rec.spec.volumes[:volume_index]]
    return kinds.count(VolumeKind.DISK)
