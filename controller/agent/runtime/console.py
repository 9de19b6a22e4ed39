"""The guest's serial console, owned by the agent.

Both VMMs expose the serial port as a PTY (cloud-hypervisor ``--serial pty``, QEMU a
``pty`` chardev); the agent reads it and is the only writer of ``console.log``. That is
what keeps a guest reboot from wiping earlier output (cloud-hypervisor truncates a
``file=`` serial at every start and reboot) and what a browser console will fan out:
``ConsoleStream`` keeps a history ring and feeds any number of subscribers, and writes
what attached clients type into the same PTY (every client may type; docs/console.md).

cloud-hypervisor creates a new PTY at every guest reboot; ``follow`` re-reads the path
from the VMM (``vm.info`` / ``query-chardev``) whenever the PTY it reads closes, and
after an agent restart it opens the adopted VMM's PTY the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
import tty
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import structlog

from controller.agent.hypervisor import HypervisorError

log = structlog.get_logger(__name__)

HISTORY_BYTES = 80_000  # what a new subscriber gets first: about a 80x1000 screen
SUBSCRIBER_BACKLOG = 1000  # chunks queued per subscriber; a slow one loses the oldest
REOPEN_SECONDS = 0.2  # between looks for a (new) PTY
READ_CHUNK = 65536


class ConsoleSource(Protocol):
    """What ``follow`` needs of a VM (hypervisor.VM has it)."""

    log: Any

    def alive(self) -> bool: ...

    async def console_pty(self) -> str | None: ...


class ConsoleStream:
    """Console output of one VM: appended to ``log_path`` (rotated at ``max_bytes``,
    keeping ``keep`` older files ``.1`` ... ``.keep``), a history ring, subscribers."""

    def __init__(self, log_path: Path, max_bytes: int, keep: int) -> None:
        self.log_path = log_path
        self.max_bytes = max_bytes
        self.keep = keep
        self._history: deque[bytes] = deque()
        self._history_size = 0
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._log: BinaryIO | None = None
        self._pty: int | None = None  # fd of the PTY being read, also where input goes
        self._size: tuple[int, int] | None = None  # (rows, cols) last asked for
        self.on_output: Callable[[bytes], None] | None = None  # each chunk, once logged
        # Set once a PTY was opened and what was waiting in it is logged: a guest that
        # booted before then has its boot marker in console.log.
        self.caught_up = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while a VMM's PTY is open (input can reach the guest)."""
        return self._pty is not None

    def write(self, data: bytes) -> int:
        """Send keystrokes to the guest's serial port; the number of bytes taken. Nothing
        is taken while no PTY is open (the VM is down) or while the PTY's buffer is full:
        a serial line has no flow control worth waiting for."""
        if self._pty is None or not data:
            return 0
        try:
            return os.write(self._pty, data)
        except (BlockingIOError, OSError):
            return 0

    def resize(self, rows: int, cols: int) -> None:
        """Record the client's window size on the PTY. A serial line carries no size to
        the guest; this keeps the host side consistent and the size for the next PTY."""
        self._size = (rows, cols)
        if self._pty is not None:
            self._apply_size(self._pty)

    def _apply_size(self, fd: int) -> None:
        if self._size is None:
            return
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *self._size, 0, 0))

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._append(data)
        self._history.append(data)
        self._history_size += len(data)
        while self._history_size - len(self._history[0]) >= HISTORY_BYTES:
            self._history_size -= len(self._history.popleft())
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(data)
        if self.on_output is not None:
            self.on_output(data)

    def history(self) -> bytes:
        """The most recent output (at least HISTORY_BYTES once that much was seen)."""
        return b"".join(self._history)

    @contextlib.contextmanager
    def subscribe(self, history: bool = True) -> Iterator[asyncio.Queue[bytes]]:
        """A queue that gets the history first (unless ``history`` is false), then every
        new chunk."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=SUBSCRIBER_BACKLOG)
        if history and self._history:
            queue.put_nowait(self.history())
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def open_log(self) -> BinaryIO:
        """The console log, opened for appending (created if missing)."""
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while streaming
        return self._log

    def _append(self, data: bytes) -> None:
        log_file = self.open_log()
        if log_file.tell() + len(data) > self.max_bytes and log_file.tell() > 0:
            self._rotate()
            log_file = self.open_log()
        log_file.write(data)
        log_file.flush()

    def _rotate(self) -> None:
        """console.log -> .1 -> .2 ... ; the oldest beyond ``keep`` is dropped."""
        self.close()
        for i in range(self.keep, 0, -1):
            older = self.log_path.with_name(f"{self.log_path.name}.{i}")
            if i == self.keep:
                older.unlink(missing_ok=True)
            else:
                newer = self.log_path.with_name(f"{self.log_path.name}.{i + 1}")
                with contextlib.suppress(FileNotFoundError):
                    older.rename(newer)
        if self.keep > 0:
            self.log_path.rename(self.log_path.with_name(f"{self.log_path.name}.1"))
        else:
            self.log_path.unlink()

    async def follow(self, vm: ConsoleSource) -> None:
        """Read the VM's serial PTY into the stream while its VMM runs; re-open it when
        it closes (a guest reboot under cloud-hypervisor makes a new one)."""
        bound = vm.log.bind(console=str(self.log_path))
        self.open_log()  # the log exists from the VMM's start on, output or not
        while vm.alive():
            try:
                path = await vm.console_pty()
            except HypervisorError:
                path = None  # busy (rebooting) or gone: look again
            if path:
                bound.debug("reading serial console", pty=path)
                await self._read_pty(Path(path))
            await asyncio.sleep(REOPEN_SECONDS)
        self.close()

    async def _read_pty(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("serial PTY not readable", pty=str(path), error=str(exc))
            return
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: the VMM closed its side
                    log.warning("serial PTY read failed", pty=str(path), error=str(exc))
                data = b""
            if data:
                self.feed(data)
            elif not closed.done():
                closed.set_result(None)

        with contextlib.suppress(termios.error):
            # TCSANOW: TCSAFLUSH would drop what the VMM already wrote.
            tty.setraw(fd, termios.TCSANOW)  # bytes as typed: no echo or line editing here
        self._apply_size(fd)
        readable()  # what the VMM wrote before we opened it, now: see caught_up
        loop.add_reader(fd, readable)
        self._pty = fd
        self.caught_up.set()
        try:
            await closed
        finally:
            self._pty = None
            loop.remove_reader(fd)
            os.close(fd)
