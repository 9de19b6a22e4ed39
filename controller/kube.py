"""Kubernetes API access shared by the controller and the agent's node registration."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from controller.api.zmachine import GROUP, VERSION

__all__ = [
    "GROUP",
    "REQUEST_TIMEOUT",
    "VERSION",
    "ApiException",
    "LeaseObserver",
    "api_client",
    "before_each_request",
    "get_object",
    "utcnow",
]

# (connect, read) seconds for every kubernetes-client call: an API server that accepts and
# then stalls must not hang a thread for ever (urllib3 waits without limit by default).
REQUEST_TIMEOUT: tuple[float, float] = (5.0, 20.0)


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials inside a pod, else the given or default kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.ApiClient()
    else:
        api = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig or os.environ.get("KUBECONFIG")
        )
    before_each_request(api, _default_timeout)
    return api


RequestHook = Callable[[str, str, dict[str, Any]], None]


def before_each_request(api: client.ApiClient, hook: RequestHook) -> None:
    """Run `hook(method, url, kwargs)` in front of every HTTP request `api` sends."""
    rest = api.rest_client
    send: Callable[..., Any] = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        hook(method, url, kwargs)
        return send(method, url, *args, **kwargs)

    # An instance attribute shadows the method for this client only.
    setattr(rest, "request", request)  # noqa: B010


def _default_timeout(_method: str, _url: str, kwargs: dict[str, Any]) -> None:
    """REQUEST_TIMEOUT for every call that does not pass its own `_request_timeout`."""
    if kwargs.get("_request_timeout") is None:
        kwargs["_request_timeout"] = REQUEST_TIMEOUT


def get_object(obj: object) -> dict[str, Any]:
    """The custom-objects API returns untyped JSON; every object it returns is a mapping."""
    assert isinstance(obj, dict)
    return obj


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def micro_time() -> str:
    """Now as metav1.MicroTime: exactly six fractional digits, which isoformat may omit."""
    return utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseObserver:
    """Judges Leases by this process's monotonic clock, never by comparing their renewTime
    with our wall clock (client-go's observedTime): a Lease is expired when its record has
    not changed for leaseDurationSeconds since we first saw it as it is now. Two hosts'
    clocks may disagree by any amount; elapsed time on one host does not depend on that."""

    _seen: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    def observe(self, lease: client.V1Lease, now: float | None = None) -> float:
        """When (monotonic) the record was first seen as it is now."""
        meta = lease.metadata
        key = (str(meta.namespace if meta else ""), str(meta.name if meta else ""))
        version = str(meta.resource_version if meta else "")
        seen = self._seen.get(key)
        if seen is None or seen[0] != version:
            seen = (version, time.monotonic() if now is None else now)
            self._seen[key] = seen
        return seen[1]

    def expired(self, lease: client.V1Lease, now: float | None = None) -> bool:
        """No holder, or the record unchanged for its whole duration by our clock."""
        moment = time.monotonic() if now is None else now
        observed = self.observe(lease, moment)
        spec = lease.spec
        if spec is None or not spec.holder_identity:
            return True
        return moment >= observed + (spec.lease_duration_seconds or 0)
