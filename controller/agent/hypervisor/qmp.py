"""QMP (QEMU Machine Protocol) on the maintained ``qemu.qmp`` client.

Commands: one connection per command (QEMU serves one client per monitor socket, and the
VMM may be gone between two calls). Events: ``follow_events`` holds a connection to a
second monitor that only the agent's event follower uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import qemu.qmp
from qemu.qmp import QMPClient

from controller.agent.hypervisor.base import HypervisorError

RUNSTATE_POLL_SECONDS = 0.5
# The library logs every failed connect at ERROR through stdlib logging; here each failure
# is raised as a QMPError and logged (or not) by the caller, once.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMPError(HypervisorError):
    pass


class QMP:
    def __init__(self, socket: Path, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = QMPClient(f"zm-{self.socket}")
        connected = False
        try:
            async with asyncio.timeout(self.timeout):
                await client.connect(str(self.socket))
                connected = True
                try:
                    return await client.execute(command, arguments)
                finally:
                    with contextlib.suppress(qemu.qmp.QMPError, OSError, EOFError):
                        await client.disconnect()
        except qemu.qmp.ExecuteError as exc:
            raise QMPError(f"QMP {self.socket}: {command}: {exc.error_class}: {exc}") from exc
        except (qemu.qmp.QMPError, OSError, TimeoutError, EOFError) as exc:
            if command == "quit" and connected:  # QEMU may exit before its reply gets out
                return None
            raise QMPError(f"QMP {self.socket}: {command} failed: {exc!r}") from exc


async def follow_events(socket: Path, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Call ``on_event`` with every QMP event on ``socket`` until QEMU goes away.

    Raises QMPError if the monitor cannot be reached at all.
    """
    client = QMPClient(f"zm-events-{socket}")
    try:
        await client.connect(str(socket))
    except (qemu.qmp.QMPError, OSError) as exc:
        raise QMPError(f"QMP {socket}: cannot follow events: {exc!r}") from exc
    try:
        with client.listener() as listener:
            while client.runstate is qemu.qmp.Runstate.RUNNING:
                # Polled: runstate_changed() misses a change that happens before it runs.
                try:
                    event = await asyncio.wait_for(listener.get(), RUNSTATE_POLL_SECONDS)
                except TimeoutError:
                    continue
                on_event(dict(event))
            for rest in listener.clear():  # events that arrived with the disconnect
                on_event(dict(rest))
    finally:
        with contextlib.suppress(qemu.qmp.QMPError, OSError, EOFError):
            await client.disconnect()
