"""Async client for cloud-hypervisor's REST API (HTTP/1.1 over its UNIX socket), on httpx.

Verbs as documented: GET for vmm.ping, vm.info, vm.counters; PUT for everything else.
Success is 200 (with a JSON body, or none: vmm.shutdown) or 204 (no body, and no
Content-Length either).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import httpx

from controller.agent.hypervisor.base import HypervisorError

API_PREFIX = "/api/v1/"
# httpx logs every request at INFO through stdlib logging (several a second per VM);
# failures are raised here and logged by the caller.
logging.getLogger("httpx").setLevel(logging.WARNING)
# Plain HTTP over a UNIX socket: TLS is never used, but httpx builds an SSL context for each
# transport unless given one, loading certifi's CA bundle every time. That was two thirds of
# an agent's CPU in a burst of VMs (py-spy, docs/benchmarks.md). Built once, here.
_UNUSED_TLS = ssl.create_default_context()


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
        # One connection per request: the VMM may be gone between two calls.
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket), verify=_UNUSED_TLS)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url=f"http://localhost{API_PREFIX}", timeout=self.timeout
            ) as client:
                response = await client.request(
                    method, endpoint, json=body, headers={"Accept": "application/json"}
                )
        except httpx.HTTPError as exc:
            raise HypervisorError(
                f"cloud-hypervisor API {self.socket}: {what} failed: {exc!r}"
            ) from exc
        if response.status_code >= 300:
            raise CloudHypervisorAPIError(
                self.socket, what, response.status_code, response.text.strip()
            )
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise HypervisorError(
                f"cloud-hypervisor API {self.socket}: {what}: not JSON: {response.text[:200]!r}"
            ) from exc

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
