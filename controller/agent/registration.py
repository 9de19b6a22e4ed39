"""The agent registers its node as a ZmachineNode and renews a Lease as its heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
import urllib3
from kubernetes import client

from controller.api.conditions import set_condition
from controller.api.zmachinenode import PLURAL
from controller.kube import GROUP, VERSION, ApiException, api_client, get_object, micro_time

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

NodeInfoFn = Callable[[], Awaitable[Any]]  # returns a zmachine.agent.v1 NodeInfoResponse


@dataclass(frozen=True)
class Registration:
    node_name: str
    address: str
    lease_namespace: str
    kubeconfig: str | None = None
    interval: float = 10.0
    lease_seconds: int = 20


def lease_name(node: str) -> str:
    return f"zmachine-node-{node}"


class Registrar:
    def __init__(self, reg: Registration, node_info: NodeInfoFn) -> None:
        self.reg = reg
        self.node_info = node_info
        api = api_client(reg.kubeconfig)
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.core = client.CoreV1Api(api)
        self.log = log.bind(node=reg.node_name)
        # Its own thread: in the shared default executor the heartbeat queued behind a
        # burst of provisioning work and the Lease expired on a node that was fine.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat")

    async def run(self) -> None:
        """Heartbeat until cancelled; API errors are logged and retried, never fatal."""
        while True:
            try:
                info = await self.node_info()
                await asyncio.get_running_loop().run_in_executor(self._thread, self.beat, info)
            # urllib3's errors (MaxRetryError when the API server is unreachable, timeouts)
            # are no OSError: without them here one outage would end the heartbeat for good.
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                self.log.warning("registration failed; retrying", error=str(exc))
            await asyncio.sleep(self.reg.interval)

    def beat(self, info: Any) -> None:
        current = self._ensure_node()
        self._renew_lease()  # first: a slow status write must not make the Lease late
        self._patch_status(current, info)

    def _ensure_node(self) -> dict[str, Any]:
        """The node's ZmachineNode as stored, created or its spec corrected first."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ZmachineNode",
            "metadata": {"name": self.reg.node_name},
            "spec": {"address": self.reg.address, "leaseNamespace": self.reg.lease_namespace},
        }
        try:
            current = get_object(
                self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.reg.node_name)
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            created = self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
            self.log.info("registered ZmachineNode", address=self.reg.address)
            return get_object(created)
        if current.get("spec") != body["spec"]:
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, self.reg.node_name, {"spec": body["spec"]}
            )
        return current

    def _labels(self) -> dict[str, str]:
        try:
            node = self.core.read_node(self.reg.node_name)
        except ApiException as exc:
            if exc.status in (403, 404):  # no Kubernetes node of that name (local runs)
                return {}
            raise
        return dict((node.metadata.labels if node.metadata else None) or {})

    def _patch_status(self, current: dict[str, Any], info: Any) -> None:
        existing = (current.get("status") or {}).get("conditions") or []
        status = {
            "capacity": {"cpu": info.capacity.cpu, "memory": _mi(info.capacity.memory_bytes)},
            "allocatable": {
                "cpu": info.capacity.cpu,
                "memory": _mi(info.capacity.memory_bytes),
            },
            "hypervisor": info.hypervisor,
            "hypervisorVersion": info.hypervisor_version,
            "hardwareAcceleration": info.hardware_acceleration,
            "agentVersion": info.agent_version,
            "wireguardPublicKey": info.wireguard_public_key or None,
            "underlayAddress": info.underlay_address or None,
            "publicInterface": info.public_interface or None,
            "planetaryPeer": info.planetary_peer or None,
            "mycelium": info.mycelium,
            "labels": self._labels(),
            "conditions": set_condition(
                existing, "Ready", True, "AgentReady", "agent answers and renews its Lease", None
            ),
        }
        self.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, self.reg.node_name, {"status": status}
        )

    def _renew_lease(self) -> None:
        name, ns = lease_name(self.reg.node_name), self.reg.lease_namespace
        now = micro_time()
        spec = {
            "holderIdentity": self.reg.node_name,
            "leaseDurationSeconds": self.reg.lease_seconds,
            "renewTime": now,
        }
        try:
            self.coordination.patch_namespaced_lease(name, ns, {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": name}, "spec": spec | {"acquireTime": now}}
            self.coordination.create_namespaced_lease(ns, body)  # type: ignore[arg-type]


def _mi(nbytes: int) -> str:
    return f"{nbytes // (1024 * 1024)}Mi"
