"""What every hypervisor driver provides, and the process plumbing they share.

A ``Hypervisor`` turns a ``VMConfig`` into a detached VMM process (own session, output
appended to ``<state_dir>/vmm.log``, identity in ``<state_dir>/vmm.pid``) and hands back
a ``VM``: a handle on that process with pause/resume/power-button/stats/stop. A handle
can also be re-made after an agent restart, from the pid file (``adopt``) or from a
stored ProcessRef (``attach``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar

import structlog

from controller.agent.errors import Unavailable
from controller.agent.network import netns_argv
from controller.agent.procs import ProcessRef, cmdline, exit_code, spawn_detached, terminate
from controller.agent.vmconfig import VMConfig

log = structlog.get_logger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class HypervisorError(Unavailable):
    """The VMM could not be started, reached or controlled."""


@dataclass(frozen=True)
class ExitStatus:
    """How a VMM process ended, as ``Popen.returncode`` reports it."""

    code: int  # >= 0: exit status; < 0: killed by signal -code

    @property
    def poweroff(self) -> bool:
        """The guest powered off (or a requested shutdown): nothing to restart for."""
        return self.code == 0

    @property
    def signal(self) -> int | None:
        return -self.code if self.code < 0 else None

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return "guest powered off" if self.poweroff else f"VMM failed with exit status {self.code}"


@dataclass(frozen=True)
class VMStats:
    state: str  # "running", "paused", or the hypervisor's own word for anything else
    cpu_seconds: float  # user + system time of the VMM process (all vCPU threads)
    rss_bytes: int
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # per device id


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def process_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and resident bytes of ``pid`` from /proc; zeros if it is gone."""
    fields = _stat_fields(pid)
    try:
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return 0.0, 0
    if fields is None:
        return 0.0, 0
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK, int(statm.split()[1]) * _PAGE


def still_running(ref: ProcessRef) -> bool:
    """Same pid and start time, not a zombie: enough for a process we identified already.

    The command-line marker (ProcessRef.alive) is for adoption after a restart; it is
    briefly absent while a process execs (e.g. "nsenter --net" becoming the VMM).
    """
    if exit_code(ref) is not None:
        return False
    fields = _stat_fields(ref.pid)
    if fields is not None and int(fields[1]) == os.getpid():
        # Our child, not reaped yet: a zombie leader whose other threads are still
        # exiting cannot be waited for, and its exit status is not known yet.
        return True
    return ProcessRef.of(ref.pid, ref.marker).start_time == ref.start_time


def log_tail(path: Path, size: int = 2048) -> str:
    """The last ``size`` bytes of a log, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            data = f.read()
    except OSError:
        return "(no log)"
    return data.decode(errors="replace").strip() or "(empty log)"


@cache
def version_output(binary: str) -> str:
    """First line of ``binary --version`` (cached per binary)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HypervisorError(f"{binary} --version failed: {exc}") from exc
    return out.strip().splitlines()[0] if out.strip() else ""


class VM(ABC):
    """A running (or exited) VMM process for one VMConfig."""

    def __init__(self, cfg: VMConfig, ref: ProcessRef) -> None:
        self.cfg = cfg
        self.ref = ref
        self.log = log.bind(vm_id=cfg.vm_id, pid=ref.pid)

    def alive(self) -> bool:
        return still_running(self.ref)

    def exit_status(self) -> ExitStatus | None:
        """Known only for a VMM this agent process started and that has exited."""
        code = exit_code(self.ref)
        return None if code is None else ExitStatus(code)

    async def wait(self, seconds: float) -> bool:
        """True once the process is gone, False if it still runs after ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    @abstractmethod
    async def ready(self) -> bool:
        """One attempt to reach the VMM's control socket."""

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def power_button(self) -> None:
        """ACPI power button: a polite shutdown request the guest may ignore."""

    @abstractmethod
    async def hard_stop(self) -> None:
        """Stop the VM now (no guest cooperation) and make the VMM process exit."""

    @abstractmethod
    async def state(self) -> str: ...

    async def counters(self) -> dict[str, dict[str, int]]:
        return {}

    @abstractmethod
    async def console_pty(self) -> str | None:
        """Path of the serial console PTY when the VM was started with ``serial_pty``."""

    async def stats(self) -> VMStats:
        cpu, rss = process_usage(self.ref.pid)
        return VMStats(await self.state(), cpu, rss, await self.counters())

    async def stop(
        self, grace: float = 30.0, hard_grace: float = 5.0, term_grace: float = 5.0
    ) -> ExitStatus | None:
        """Power button, then hard stop, then SIGTERM, then SIGKILL, each with a timeout.

        Returns the exit status when known (see ``exit_status``). Removes the pid file and
        control socket.
        """
        steps = ((self.power_button, grace, "power button"), (self.hard_stop, hard_grace, "stop"))
        for action, timeout, what in steps:
            if not self.alive():
                break
            try:
                await action()
            except HypervisorError as exc:
                self.log.warning(f"{what} request failed", error=str(exc))
            if await self.wait(timeout):
                break
            self.log.info(f"VMM still running {timeout:.0f}s after {what}")
        if self.alive():
            await terminate(self.ref, term_grace)
        status = self.exit_status()
        self.log.info("VMM stopped", status=status.describe() if status else "unknown")
        self.cfg.pid_file.unlink(missing_ok=True)
        self.cfg.api_socket.unlink(missing_ok=True)
        return status


class Hypervisor(ABC):
    name: ClassVar[str]

    def __init__(self, binary: str) -> None:
        self.binary = binary

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def acceleration(self) -> str:
        """``kvm`` or ``tcg``: what guests of this driver run on."""

    @abstractmethod
    def command(self, cfg: VMConfig) -> list[str]:
        """The VMM's own argv for ``cfg`` (without the network-namespace prefix)."""

    @abstractmethod
    def require_disk_boot(self) -> None:
        """Raise FailedPrecondition if this node cannot boot a disk image (image mode);
        checked before a Deploy touches anything."""

    @abstractmethod
    def attach(self, cfg: VMConfig, ref: ProcessRef) -> VM:
        """A handle on an already running VMM process (no checks)."""

    def argv(self, cfg: VMConfig) -> list[str]:
        return [*netns_argv(cfg.netns), *self.command(cfg)]

    async def start(self, cfg: VMConfig, ready_within: float = 15.0) -> VM:
        """Start the VMM detached and wait until its control socket answers.

        virtiofsd for every share must already be running. On failure the process is
        killed and HypervisorError carries the tail of the VMM log.
        """
        cfg.validate()
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.serial_log.parent.mkdir(parents=True, exist_ok=True)
        # A stale socket (or CH >= 53's lock file) from a previous run blocks the bind.
        cfg.api_socket.unlink(missing_ok=True)
        cfg.api_socket.with_name(cfg.api_socket.name + ".lock").unlink(missing_ok=True)
        try:
            ref = spawn_detached(self.argv(cfg), cfg.vmm_log, marker=str(cfg.api_socket))
        except OSError as exc:
            raise HypervisorError(f"vm {cfg.vm_id!r}: cannot run {self.binary}: {exc}") from exc
        cfg.pid_file.write_text(json.dumps(asdict(ref)))
        vm = self.attach(cfg, ref)
        vm.log.info("VMM started", hypervisor=self.name, accel=self.acceleration())
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if not vm.alive():
                status = vm.exit_status()
                cfg.pid_file.unlink(missing_ok=True)
                raise HypervisorError(
                    f"vm {cfg.vm_id!r}: {self.name} exited before it was ready "
                    f"({status.describe() if status else 'status unknown'}): "
                    f"{log_tail(cfg.vmm_log)}"
                )
            if await vm.ready():
                return vm
            await asyncio.sleep(0.05)
        await terminate(vm.ref)
        cfg.pid_file.unlink(missing_ok=True)
        raise HypervisorError(
            f"vm {cfg.vm_id!r}: {self.name} control socket {cfg.api_socket} did not answer "
            f"within {ready_within:.0f}s: {log_tail(cfg.vmm_log)}"
        )

    def adopt(self, cfg: VMConfig) -> VM | None:
        """The VM's running VMM, found from its pid file; None if it is not running.

        The pid must still be the same process (start time) running this driver's binary
        with this VM's control socket on its command line.
        """
        try:
            ref = ProcessRef(**json.loads(cfg.pid_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        argv = cmdline(ref.pid)
        if not ref.alive() or not argv or Path(argv[0]).name != Path(self.binary).name:
            return None
        return self.attach(cfg, ref)
