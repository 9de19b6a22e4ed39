"""Detached helper processes (VMM, virtiofsd, FUSE mounts) that outlive the agent.

A pid alone is not an identity: after an agent restart the pid may belong to something
else. A ProcessRef also keeps the kernel start time and a marker that must appear in the
command line (the VM's uid is part of every path we pass), and adoption checks all three.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int
    marker: str  # substring that must appear in the process's command line

    def alive(self) -> bool:
        child = _children.get(self.pid)
        if child is not None:
            # Our own child: ask waitpid. An exiting process loses its cmdline before it
            # becomes a zombie, and the marker check would report it dead too early,
            # before its exit status can be read.
            return child.poll() is None
        if self.pid <= 0 or _start_time(self.pid) != self.start_time:
            return False
        return any(self.marker in arg for arg in cmdline(self.pid))

    @classmethod
    def of(cls, pid: int, marker: str) -> ProcessRef:
        return cls(pid, _start_time(pid) or 0, marker)


# Children this agent process spawned: polling them reaps zombies and yields the exit
# status. Processes adopted after a restart are not our children; their status is unknown.
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn_detached(argv: Sequence[str], log_path: Path, marker: str) -> ProcessRef:
    """Start ``argv`` in its own session with output appended to ``log_path``.

    The new session keeps it alive when the agent dies or its process group is signalled.
    """
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    return ProcessRef.of(proc.pid, marker)


def exit_code(ref: ProcessRef) -> int | None:
    """Exit status of a child we spawned and that has exited; None if unknown or running."""
    proc = _children.get(ref.pid)
    return None if proc is None else proc.poll()


def reap_children() -> None:
    """Collect our exited children so they do not linger as zombies (and read as alive)."""
    for proc in list(_children.values()):
        proc.poll()


async def terminate(ref: ProcessRef, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; no-op if already gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not ref.alive():
            return
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap_children()
            if not ref.alive():
                return
            await asyncio.sleep(0.05)
    log.warning("process survived SIGKILL", pid=ref.pid, marker=ref.marker)
