"""Leader election through a coordination.k8s.io Lease: one active controller at a time.

A standby replica waits in `acquire` before kopf starts; the leader renews from a thread and
stops its own process (SIGTERM, so kopf shuts down cleanly) if it ever loses the Lease.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import structlog
from kubernetes import client

from controller.kube import ApiException, lease_is_fresh, utcnow

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

LEASE_NAME = "zmachine-controller"


def _now() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, duration: int = 15) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.duration = duration
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log = log.bind(identity=self.identity, lease=f"{namespace}/{LEASE_NAME}")

    def try_acquire(self) -> bool:
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": _now(),
        }
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": LEASE_NAME}, "spec": spec | {"acquireTime": _now()}}
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)  # type: ignore[arg-type]
            except ApiException as create_exc:
                if create_exc.status == 409:  # another replica was faster
                    return False
                raise
            return True
        holder = lease.spec.holder_identity if lease.spec else None
        if holder != self.identity and lease_is_fresh(lease):
            return False
        # resourceVersion makes the takeover atomic: a concurrent writer gets a 409.
        version = lease.metadata.resource_version if lease.metadata else None
        patch: dict[str, object] = {"metadata": {"resourceVersion": version}, "spec": spec}
        if holder != self.identity:
            patch["spec"] = spec | {"acquireTime": _now()}
        try:
            self.coordination.patch_namespaced_lease(LEASE_NAME, self.namespace, patch)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def acquire(self, retry: float = 2.0) -> None:
        announced = False
        while not self.try_acquire():
            if not announced:
                self.log.info("another controller leads; standing by")
                announced = True
            time.sleep(retry)
        self.log.info("became leader")

    def keep(self) -> threading.Thread:
        thread = threading.Thread(target=self._renew_loop, name="leader-renew", daemon=True)
        thread.start()
        return thread

    def _renew_loop(self) -> None:
        interval = self.duration / 3
        last_ok = time.monotonic()
        while True:
            time.sleep(interval)
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
                self.log.error("lost leadership to another controller; stopping")
            except (ApiException, OSError) as exc:
                if time.monotonic() - last_ok < self.duration:
                    self.log.warning("lease renewal failed; retrying", error=str(exc))
                    continue
                self.log.error("could not renew the lease in time; stopping", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            return
