"""Minimal async QMP client (QEMU Machine Protocol, JSON lines over a UNIX socket).

One connection per command: greeting, ``qmp_capabilities``, the command; asynchronous
events arriving in between are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from controller.agent.hypervisor.base import HypervisorError


class QMPError(HypervisorError):
    pass


class QMP:
    def __init__(self, socket: Path, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._execute(command, arguments)
        except (OSError, TimeoutError, ValueError) as exc:
            raise QMPError(f"QMP {self.socket}: {command} failed: {exc!r}") from exc

    async def _execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            greeting = await self._read(reader)
            if greeting is None or "QMP" not in greeting:
                raise ValueError(f"unexpected greeting {greeting!r}")
            await self._command(reader, writer, "qmp_capabilities", None)
            return await self._command(reader, writer, command, arguments)
        finally:
            writer.close()
            with contextlib.suppress(OSError):  # QEMU closed first (quit)
                await writer.wait_closed()

    async def _command(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        command: str,
        arguments: dict[str, Any] | None,
    ) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()
        while True:  # events may arrive before the reply
            reply = await self._read(reader)
            if reply is None:
                if command == "quit":  # QEMU may exit before its reply gets out
                    return None
                raise ValueError("connection closed")
            if "error" in reply:
                err = reply["error"]
                raise QMPError(
                    f"QMP {self.socket}: {command}: {err.get('class')}: {err.get('desc')}"
                )
            if "return" in reply:
                return reply["return"]

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
        line = await reader.readline()
        if not line:
            return None
        reply: dict[str, Any] = json.loads(line)
        return reply
