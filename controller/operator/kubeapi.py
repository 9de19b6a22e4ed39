"""The controller's own API calls, outside kopf's patches: every one async, with a timeout.

Placement goes through here (`bind`/`unbind`) rather than through kopf's end-of-handler patch:
a node is written to `status.nodeName` with the object's resourceVersion *before* anything is
deployed, so a restarted or concurrent controller sees it, and a stale view gets a conflict
instead of a second placement.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client

from controller.api.zmachine import GROUP, PLURAL, VERSION
from controller.api.zmachinenetwork import PLURAL as NETWORK_PLURAL
from controller.api.zmachinenode import PLURAL as NODE_PLURAL
from controller.api.zmachinepublicippool import PLURAL as POOL_PLURAL
from controller.kube import ApiException, get_object, micro_time
from controller.operator.errors import ControllerError

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)


class Conflict(ControllerError):
    """The object changed since it was read (HTTP 409): read it again and decide again."""

    reason = "Conflict"


class Gone(ControllerError):
    """The object no longer exists (HTTP 404)."""

    reason = "Gone"


class ApiUnavailable(ControllerError):
    """The API server did not answer in time or answered with an error."""

    reason = "ApiUnavailable"


@dataclass
class Kube:
    api: client.ApiClient

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            # The client's default timeout applies (controller.kube.api_client).
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{what}: the object changed meanwhile") from exc
            if exc.status == 404:
                raise Gone(f"{what}: not found") from exc
            raise ApiUnavailable(f"{what}: HTTP {exc.status} {exc.reason}") from exc
        except Exception as exc:  # urllib3 raises MaxRetryError, timeouts, resets...
            raise ApiUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def zmachine(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the API server has it now, or None when it is gone."""
        return await self._get("zmachine", PLURAL, namespace, name)

    async def _get(
        self, kind: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            found = await self._call(
                f"get {kind} {namespace}/{name}",
                self.custom.get_namespaced_custom_object,
                GROUP, VERSION, namespace, plural, name,
            )  # fmt: skip
        except Gone:
            return None
        return get_object(found)

    async def _patch(
        self, what: str, namespace: str, name: str, body: dict[str, Any], status: bool
    ) -> dict[str, Any]:
        """A merge patch of a Zmachine (its status subresource with `status`); the object
        as written."""
        fn = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        found = await self._call(
            f"{what} zmachine {namespace}/{name}", fn, GROUP, VERSION, namespace, PLURAL, name, body
        )
        return get_object(found)

    async def set_node(
        self,
        namespace: str,
        name: str,
        resource_version: str,
        node: str | None,
        status: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write status.nodeName (and `status`, in the same write) only if the object is
        still at `resource_version`."""
        body = {
            "metadata": {"resourceVersion": resource_version},
            "status": {**(status or {}), "nodeName": node},
        }
        return await self._patch("bind" if node else "unbind", namespace, name, body, True)

    async def set_finalizers(
        self, namespace: str, name: str, resource_version: str, finalizers: list[str]
    ) -> dict[str, Any]:
        """Replace metadata.finalizers only if the object is still at `resource_version`."""
        body = {"metadata": {"resourceVersion": resource_version, "finalizers": finalizers}}
        return await self._patch("set finalizers of", namespace, name, body, False)

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._patch("patch status of", namespace, name, {"status": status}, True)

    async def list_nodes(self) -> list[dict[str, Any]]:
        found = await self._call(
            "list zmachinenodes", self.custom.list_cluster_custom_object, GROUP, VERSION,
            NODE_PLURAL,
        )  # fmt: skip
        items: list[dict[str, Any]] = get_object(found).get("items", [])
        return items

    async def list_zmachines(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Zmachine, or those of `namespace`."""
        return await self._list(PLURAL, namespace)

    async def list_networks(self) -> list[dict[str, Any]]:
        return await self._list(NETWORK_PLURAL, None)

    async def _list(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            found = await self._call(
                f"list {plural}", self.custom.list_cluster_custom_object, GROUP, VERSION, plural
            )
        else:
            found = await self._call(
                f"list {plural} in {namespace}",
                self.custom.list_namespaced_custom_object,
                GROUP, VERSION, namespace, plural,
            )  # fmt: skip
        items: list[dict[str, Any]] = get_object(found).get("items", [])
        return items

    async def network(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ZmachineNetwork as the API server has it now, or None when it is gone."""
        return await self._get("zmachinenetwork", NETWORK_PLURAL, namespace, name)

    async def patch_network_status(
        self, namespace: str, name: str, resource_version: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the network's status only if it is still at `resource_version`."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        found = await self._call(
            f"patch zmachinenetwork {namespace}/{name} status",
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, NETWORK_PLURAL, name, body,
        )  # fmt: skip
        return get_object(found)

    async def list_pools(self) -> list[dict[str, Any]]:
        return await self._list(POOL_PLURAL, None)

    async def patch_pool_status(
        self, name: str, resource_version: str, status: dict[str, Any]
    ) -> None:
        """Write the pool's status only if it is still at `resource_version`."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        await self._call(
            f"patch zmachinepublicippool {name} status",
            self.custom.patch_cluster_custom_object_status,
            GROUP, VERSION, POOL_PLURAL, name, body,
        )  # fmt: skip

    async def patch_node(self, name: str, body: dict[str, Any], status: bool) -> None:
        fn = (
            self.custom.patch_cluster_custom_object_status
            if status
            else self.custom.patch_cluster_custom_object
        )
        await self._call(f"patch zmachinenode {name}", fn, GROUP, VERSION, NODE_PLURAL, name, body)

    async def lease(self, namespace: str, name: str) -> client.V1Lease | None:
        try:
            lease: client.V1Lease = await self._call(
                f"read lease {namespace}/{name}",
                self.coordination.read_namespaced_lease,
                name,
                namespace,
            )
        except Gone:
            return None
        return lease

    async def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event outside a kopf handler (kopf can post only from its per-object tasks).
        Best effort: a lost Event is logged, never fatal."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = micro_time()
        body = {
            "metadata": {
                "generateName": f"{meta.get('name', 'zmachine')}.",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "zmachine-controller"},
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "reportingComponent": "zmachine-controller",
            "reportingInstance": "zmachine-controller",
            "action": reason,
            "count": 1,
        }
        try:
            await self._call("post event", self.core.create_namespaced_event, namespace, body)
        except ControllerError as exc:
            log.warning("event not posted", reason=reason, error=str(exc))


def age_seconds(timestamp: str | None, now: datetime.datetime | None = None) -> float:
    """Seconds since an RFC 3339 timestamp of the API server (0 when absent)."""
    if not timestamp:
        return 0.0
    since = datetime.datetime.fromisoformat(timestamp)
    return ((now or datetime.datetime.now(datetime.UTC)) - since).total_seconds()
