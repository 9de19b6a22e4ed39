"""Async client for cloud-hypervisor's REST API: HTTP/1.1 over its UNIX socket.

One connection per request (``Connection: close``), JSON bodies with Content-Length.
Verbs as documented: GET for vmm.ping, vm.info, vm.counters; PUT for everything else.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from controller.agent.hypervisor.base import HypervisorError

API_PREFIX = "/api/v1/"


class CloudHypervisorAPIError(HypervisorError):
    def __init__(self, socket: Path, request: str, status: int, body: str) -> None:
        super().__init__(f"cloud-hypervisor API {socket}: {request} -> HTTP {status}: {body}")
        self.status = status


class CloudHypervisorAPI:
    def __init__(self, socket: Path, timeout: float = 5.0) -> None:
        self.socket = socket
        self.timeout = timeout

    async def request(self, method: str, endpoint: str, body: Any = None) -> Any:
        """Send one request; returns the decoded JSON body, or None for an empty one."""
        what = f"{method} {API_PREFIX}{endpoint}"
        payload = b"" if body is None else json.dumps(body).encode()
        head = [
            f"{what} HTTP/1.1",
            "Host: localhost",
            "Accept: application/json",
            "Connection: close",
            f"Content-Length: {len(payload)}",
        ]
        if body is not None:
            head.append("Content-Type: application/json")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        try:
            async with asyncio.timeout(self.timeout):
                status, data = await self._exchange(raw)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            raise HypervisorError(
                f"cloud-hypervisor API {self.socket}: {what} failed: {exc!r}"
            ) from exc
        text = data.decode(errors="replace")
        if status >= 300:
            raise CloudHypervisorAPIError(self.socket, what, status, text.strip())
        return json.loads(text) if text.strip() else None

    async def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(raw)
            await writer.drain()
            status_line = (await reader.readline()).decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise ValueError(f"bad status line {status_line!r}")
            status = int(parts[1])
            length: int | None = None
            while (line := (await reader.readline()).decode("latin-1").strip()) != "":
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length is not None:
                data = await reader.readexactly(length)
            elif status in (204, 304) or status < 200:
                data = b""
            else:
                data = await reader.read()
            return status, data
        finally:
            writer.close()
            await writer.wait_closed()

    async def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "vmm.ping")
        return result

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "vm.info")
        return result

    async def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] | None = await self.request("GET", "vm.counters")
        return result or {}

    async def pause(self) -> None:
        await self.request("PUT", "vm.pause")

    async def resume(self) -> None:
        await self.request("PUT", "vm.resume")

    async def power_button(self) -> None:
        await self.request("PUT", "vm.power-button")

    async def shutdown(self) -> None:
        """Hard stop of the VM; the VMM process keeps running."""
        await self.request("PUT", "vm.shutdown")

    async def vmm_shutdown(self) -> None:
        """Stop the VM and make the VMM process exit."""
        await self.request("PUT", "vmm.shutdown")
