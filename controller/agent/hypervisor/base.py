"""What every hypervisor driver provides, and the process plumbing they share.

A ``Hypervisor`` turns a ``VMConfig`` into a detached VMM process (own session, output
appended to ``<state_dir>/vmm.log``, identity in ``<state_dir>/vmm.pid``) and hands back
a ``VM``: a handle on that process with pause/resume/power-button/stats/stop. A handle
can also be re-made after an agent restart, from the pid file (``adopt``) or from a
stored ProcessRef (``attach``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import ClassVar

import structlog

from controller.agent.errors import Unavailable
from controller.agent.guest.vmconfig import VMConfig
from controller.agent.network.local import netns_argv
from controller.agent.runtime.procs import ProcessRef, cmdline, exit_code, spawn_detached, terminate

log = structlog.get_logger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class HypervisorError(Unavailable):
    """The VMM could not be started, reached or controlled."""


@dataclass(frozen=True)
class ExitStatus:
    """How a VMM process ended, as ``Popen.returncode`` reports it. Says nothing about
    the guest (see GuestExit)."""

    code: int  # >= 0: exit status; < 0: killed by signal -code

    @property
    def signal(self) -> int | None:
        return -self.code if self.code < 0 else None

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with status {self.code}"


class GuestExit(StrEnum):
    """Why a VM ended, as the drivers tell it from the VMM's own events.

    A VMM exit status alone cannot tell: cloud-hypervisor exits 0 on a guest power-off,
    on SIGTERM, on ``vmm.shutdown`` and after some vCPU or device errors; QEMU exits 0 on
    SIGTERM and ``quit``. So both VMMs run with "do not exit on guest power-off"
    (CH ``--no-shutdown``, QEMU ``-no-shutdown``): a powered-off guest leaves its VMM up
    with the VM shut down, which the driver sees, records and then ends. Reboots and
    panics (``reboot=k panic=1``) are handled inside the VMM and end nothing; REBOOT is
    a reboot the VMM could not carry out.
    """

    POWEROFF = "PowerOff"  # the guest powered itself off
    REBOOT = "Reboot"  # the VMM died while rebooting the guest
    PANIC = "Panic"  # the guest reported a panic (pvpanic) and the VMM ended
    VMM_ERROR = "VMMError"  # the VMM failed or vanished without an orderly shutdown
    KILLED = "Killed"  # a signal killed the VMM (SIGKILL, SIGSYS from seccomp, OOM)
    HOST_STOP = "HostStop"  # an orderly VMM exit asked for by someone else (SIGTERM, API)
    STOPPED_BY_AGENT = "StoppedByAgent"  # this agent stopped it (Delete, Restart, update)

    @property
    def clean(self) -> bool:
        """Nothing went wrong: restartPolicy OnFailure leaves the machine stopped."""
        return self in (GuestExit.POWEROFF, GuestExit.STOPPED_BY_AGENT)


class GuestEvent(StrEnum):
    """What a running VM's guest did, from the VMM's event stream."""

    REBOOT = "Reboot"  # the guest reset itself (reboot, or a panic with panic=N)
    PANIC = "Panic"  # the guest reported a panic (pvpanic)
    SHUTDOWN = "Shutdown"  # the VM stopped (a guest power-off, or the host stopping it)


@dataclass(frozen=True)
class ExitRecord:
    """What the agent learnt about one VMM process's end, kept next to its pid file so
    that an agent restart still knows it (``<state_dir>/vmm-exit.json``)."""

    pid: int
    start_time: int
    exit: GuestExit
    detail: str = ""

    @classmethod
    def load(cls, cfg: VMConfig, ref: ProcessRef) -> ExitRecord | None:
        try:
            data = json.loads(cfg.exit_file.read_text())
            record = cls(data["pid"], data["start_time"], GuestExit(data["exit"]), data["detail"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if (record.pid, record.start_time) == (ref.pid, ref.start_time) else None

    def save(self, cfg: VMConfig) -> None:
        tmp = cfg.exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self), "exit": self.exit.value}))
        tmp.replace(cfg.exit_file)


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


# struct flock on x86-64 Linux: l_type, l_whence, l_start, l_len, l_pid (with padding).
_FLOCK = "hh4xqqi4x"


def lock_holder(path: Path) -> int | None:
    """Pid of the process holding a write lock on ``path`` (OFD or POSIX), else None.

    F_OFD_GETLK asks without taking the lock, so a VMM starting at the same moment is
    never blocked by this check. A holder's pid reads as -1 for an OFD lock.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else pid


PROBE_MARKER = "zm-kvm-probe-ok"
# A shell as PID 1 that prints the marker and powers off; no reboot on a panic.
PROBE_CMDLINE = f'console=ttyS0 panic=-1 rdinit=/bin/sh -- -c "echo {PROBE_MARKER}; poweroff -f"'


def guest_boots(what: str, argv: Callable[[Path], list[str]], timeout: float) -> bool:
    """Run a probe VMM (``argv(serial_log)``) that boots PROBE_CMDLINE: True if it
    printed the marker and exited 0 within ``timeout``. Nested KVM can expose /dev/kvm
    and still crash or hang every guest, so /dev/kvm alone proves nothing."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="zm-kvm-probe-") as tmp:
        serial = Path(tmp, "serial.log")
        try:
            proc = subprocess.run(argv(serial), capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log.warning("KVM probe guest hung", vmm=what, timeout=timeout)
            return False
        output = serial.read_text(errors="replace") if serial.exists() else ""
        ok = proc.returncode == 0 and PROBE_MARKER in output
        if not ok:
            log.warning(
                "KVM probe guest failed",
                vmm=what,
                returncode=proc.returncode,
                stderr=proc.stderr.decode(errors="replace")[-500:],
            )
        return ok


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
        """One attempt to reach the VMM's control socket: True once it answers and the
        VM runs (or is paused)."""

    @abstractmethod
    async def guest_powered_off(self) -> bool:
        """The VMM is up but its guest has powered off (the no-shutdown state)."""

    @abstractmethod
    def classify_exit(self, status: ExitStatus | None) -> tuple[GuestExit, str]:
        """Why this (gone) VMM ended, with a detail for messages; ``status`` when known.
        Called only when no ExitRecord and no signal tell it already."""

    @abstractmethod
    async def follow_events(self, on_event: Callable[[GuestEvent], None]) -> None:
        """Call ``on_event`` for each guest event until the VMM is gone; keeps what the
        events say in ``cfg.events_file`` for ``classify_exit``."""

    def record_exit(self, exit: GuestExit, detail: str) -> ExitRecord:
        record = ExitRecord(self.ref.pid, self.ref.start_time, exit, detail)
        record.save(self.cfg)
        self.log.info("VM ended", exit=exit.value, detail=detail)
        return record

    async def guest_exit(self) -> ExitRecord | None:
        """None while the guest runs; once it has ended, why.

        A guest that powered off leaves its VMM running (no-shutdown): that is recorded
        first (so an agent restart still knows it), then the VMM is ended here.
        """
        recorded = ExitRecord.load(self.cfg, self.ref)
        if self.alive():
            if recorded is None:
                try:
                    if not await self.guest_powered_off():
                        return None
                except HypervisorError:
                    return None  # not answering is not an exit; the next look decides
                recorded = self.record_exit(GuestExit.POWEROFF, "the guest powered off")
            await self._end()
            return recorded
        if recorded is not None:
            return recorded
        status = self.exit_status()
        if status is not None and status.signal is not None:
            return self.record_exit(GuestExit.KILLED, status.describe())
        return self.record_exit(*self.classify_exit(status))

    async def _end(self, hard_grace: float = 5.0, term_grace: float = 5.0) -> None:
        try:
            await self.hard_stop()
        except HypervisorError as exc:
            self.log.warning("stop request failed", error=str(exc))
        if not await self.wait(hard_grace):
            await terminate(self.ref, term_grace)

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

        Returns the exit status when known (see ``exit_status``). Records the end as
        STOPPED_BY_AGENT unless the VM had ended already. Removes the pid file.
        """
        if ExitRecord.load(self.cfg, self.ref) is None and self.alive():
            self.record_exit(GuestExit.STOPPED_BY_AGENT, "stopped by the agent")
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
        return status


class Hypervisor(ABC):
    name: ClassVar[str]
    # A guest reboot drops the vhost-user connections (virtiofsd then exits) and the VMM
    # reconnects: true of cloud-hypervisor, which rebuilds its devices; QEMU keeps them.
    reboot_reconnects_shares: ClassVar[bool] = False

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
        self.clear_stale_socket(cfg)
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

    def clear_stale_socket(self, cfg: VMConfig) -> None:
        """Remove a control socket left by a dead VMM; refuse while a live one holds it.

        cloud-hypervisor (v53+) holds an OFD write lock on ``<socket>.lock`` while it
        serves the socket: that lock, not the file's existence, says the socket is live,
        so the lock file is never deleted (CH takes the lock again on a stale one).
        """
        lock = cfg.api_socket.with_name(cfg.api_socket.name + ".lock")
        holder = lock_holder(lock)
        if holder is not None:
            who = f"pid {holder}" if holder > 0 else "an open file description"  # OFD: -1
            raise HypervisorError(
                f"vm {cfg.vm_id!r}: a running VMM ({who}) holds {lock}; "
                "refusing to start a second one on its socket"
            )
        cfg.api_socket.unlink(missing_ok=True)

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
