"""``zmachine-agent cleanup``: tear down every machine in a state dir, with no agent running.

For `make down` and for a node being decommissioned: whatever state the agent died in, this
removes what it made for its VMs. First each machine record is torn down as Delete would
(VMM, virtiofsd, FUSE and overlay mounts, root image loop mount, taps, the VM's directory);
then a sweep removes what no record describes (a Deploy that died before its first save):
processes whose command line names a VM directory, mounts under the state dir, and loop
devices backed by files in it. Running it twice is harmless: the second run finds nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import structlog

from controller.agent.config import AgentConfig
from controller.agent.guest.provision import Provisioner
from controller.agent.runtime.procs import cmdline
from controller.agent.runtime.state import StateStore

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)


async def cleanup(config: AgentConfig) -> int:
    """Tear down every machine; the number of records removed."""
    prov = Provisioner(config)
    store = StateStore(config.machines_dir)
    removed = 0
    for rec in store.load_all():
        # A VMM started just before the agent died may be newer than the record.
        if rec.vmm is None or not rec.vmm.alive():
            rec.vmm = prov.host.find_vmm(rec)
        await prov.teardown(rec, keep_data=False)
        await store.remove(rec.ref.uid)
        removed += 1
        log.info("machine removed", uid=rec.ref.uid, namespace=rec.ref.namespace, name=rec.ref.name)
    # Networks outlive their machines only when a teardown failed half-way.
    await asyncio.to_thread(prov.host.private.remove_all)
    sweep(config.state_dir)
    return removed


def sweep(state_dir: Path) -> None:
    """What no record describes: processes, then mounts (deepest first), loops, VM dirs."""
    vms = state_dir / "vms"
    for pid in _pids_naming(vms):
        log.warning("killing a leftover process", pid=pid, argv=" ".join(cmdline(pid))[:200])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for point in sorted(_mounts_under(state_dir), key=len, reverse=True):
        log.warning("unmounting a leftover mount", mountpoint=point)
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    for device in _loops_under(state_dir):
        log.warning("detaching a leftover loop device", device=device)
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
    if vms.is_dir():
        for vm in vms.iterdir():
            shutil.rmtree(vm, ignore_errors=True)


def _pids_naming(vms: Path) -> list[int]:
    prefix = f"{vms}/"
    return [
        int(entry.name)
        for entry in os.scandir("/proc")
        if entry.name.isdigit()
        and int(entry.name) != os.getpid()
        and any(prefix in arg for arg in cmdline(int(entry.name)))
    ]


def _mounts_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Octal escapes (\040 for a space) as the kernel writes them.
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            points.append(point)
    return points


def _loops_under(root: Path) -> list[str]:
    listing = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = []
    for line in listing.stdout.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(f"{root}/"):
            found.append(name)
    return found
