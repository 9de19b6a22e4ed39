"""Kubernetes API access shared by the controller and the agent's node registration."""

from __future__ import annotations

import datetime
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from controller.api.zmachine import GROUP, VERSION

__all__ = [
    "GROUP",
    "VERSION",
    "ApiException",
    "api_client",
    "get_object",
    "lease_is_fresh",
    "utcnow",
]


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials inside a pod, else the given or default kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig or os.environ.get("KUBECONFIG")
    )
    return api


def get_object(obj: object) -> dict[str, Any]:
    """The custom-objects API returns untyped JSON; every object it returns is a mapping."""
    assert isinstance(obj, dict)
    return obj


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def micro_time() -> str:
    """Now as metav1.MicroTime: exactly six fractional digits, which isoformat may omit."""
    return utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_is_fresh(lease: client.V1Lease, now: datetime.datetime | None = None) -> bool:
    spec = lease.spec
    if spec is None or spec.renew_time is None:
        return False
    duration = datetime.timedelta(seconds=spec.lease_duration_seconds or 0)
    renewed: datetime.datetime = spec.renew_time
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=datetime.UTC)
    return renewed + duration > (now or utcnow())
