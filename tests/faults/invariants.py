"""What every fault test checks: one VMM per Zmachine uid at every instant, and nothing
left behind once the objects are gone.

Both read the host as it is (/proc, mountinfo, losetup, ip), never the agents' own view,
because the agents are what a fault test breaks.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_VMS = re.compile(r"/vms/([0-9A-Za-z-]+)/")
_FLISTS = "/flists/"  # the node's shared flist mounts (one server per distinct flist)


def _cmdlines() -> Iterator[tuple[int, list[str]]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue  # exited while we looked
        if raw:
            yield int(entry.name), [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_vmm(argv: list[str]) -> bool:
    """cloud-hypervisor and stand-ins for it take --api-socket; QEMU is named for itself."""
    return "--api-socket" in argv or os.path.basename(argv[0]).startswith("qemu-system")


def _under(arg: str, roots: Iterable[Path]) -> bool:
    return any(str(root) in arg for root in roots)


def vmm_pids_by_uid(state_dirs: Iterable[Path]) -> dict[str, list[int]]:
    """Every live VMM started from one of `state_dirs`, by the uid in its paths."""
    roots = [d.resolve() for d in state_dirs]
    found: dict[str, list[int]] = {}
    for pid, argv in _cmdlines():
        if not _is_vmm(argv) or not any(_under(a, roots) for a in argv):
            continue
        uid = next((m.group(1) for a in argv if (m := _VMS.search(a))), None)
        if uid is not None and not _is_zombie(pid):
            found.setdefault(uid, []).append(pid)
    return found


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@dataclass
class OneVmmPerUid:
    """Samples the host in a thread; any uid seen with two VMMs at once is a violation."""

    state_dirs: list[Path]
    interval: float = 0.1
    violations: list[tuple[float, str, list[int]]] = field(default_factory=list)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for uid, pids in vmm_pids_by_uid(self.state_dirs).items():
                if len(pids) > 1:
                    self.violations.append((time.time(), uid, pids))
            self.samples += 1

    @contextmanager
    def watching(self) -> Iterator[OneVmmPerUid]:
        thread = threading.Thread(target=self._run, name="one-vmm-per-uid", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(5)
        assert self.samples > 0, "the invariant checker never sampled"
        assert not self.violations, f"more than one VMM for one uid: {self.violations[:5]}"


def _held_elsewhere(device: str) -> bool:
    """A mount namespace made while the device was mounted (another project's cluster or
    container runtime on this host) holds its own copy of the mount: the agent's unmount
    cannot reach it and the autoclear device goes with that namespace (rootlayer.unmount
    says so in a warning). Not an agent's leak."""
    ours = os.readlink("/proc/self/ns/mnt")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"{entry.path}/ns/mnt") != ours and f" {device} " in Path(
                entry.path, "mountinfo"
            ).read_text(errors="replace"):
                return True
        except OSError:
            continue  # gone, or a kernel thread
    return False


def leaks(state_dirs: Iterable[Path], netns: str | None = None) -> list[str]:
    """Everything an agent made for a VM that still exists: processes (VMM, virtiofsd,
    FUSE mounts, shared or not), mounts, loop devices, taps and machine records."""
    roots = [d.resolve() for d in state_dirs]
    found: list[str] = []
    for pid, argv in _cmdlines():
        if (
            pid != os.getpid()
            and not _is_zombie(pid)
            and any((_VMS.search(a) or _FLISTS in a) and _under(a, roots) for a in argv)
        ):
            found.append(f"process {pid}: {' '.join(argv)[:200]}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if _under(point, roots):
            found.append(f"mount {point}")
    losetup = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found += [
        f"loop {line.strip()}"
        for line in losetup.stdout.splitlines()
        if _under(line, roots) and not _held_elsewhere(line.split()[0])
    ]
    if netns is not None:
        links = subprocess.run(
            ["ip", "-n", netns, "-o", "link", "show", "type", "tun"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        found += [f"tap {line.split(':')[1].strip()}" for line in links.stdout.splitlines()]
    for root in roots:
        found += [f"record {p}" for p in (root / "machines").glob("*.json")]
        for kind in ("vms", "flists"):
            if (root / kind).is_dir():
                found += [f"{kind} dir {p}" for p in (root / kind).iterdir()]
    return found
