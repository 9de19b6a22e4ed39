"""Leader election through a coordination.k8s.io Lease: one active controller at a time.

A standby replica waits in `acquire` before kopf starts; the leader renews from a thread and
stops its own process (SIGTERM, so kopf shuts down cleanly) if it ever loses the Lease.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import structlog
from kubernetes import client

from controller.kube import ApiException, lease_is_fresh, micro_time

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

LEASE_NAME = "zmachine-controller"


class _StandbyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"standby\n")

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds are not worth a log line."""


@contextlib.contextmanager
def standby_health(port: int) -> Iterator[None]:
    """Serve /healthz on `port` until kopf takes the port over for the leader."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), _StandbyHandler)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, duration: int = 15) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.duration = duration
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log = log.bind(identity=self.identity, lease=f"{namespace}/{LEASE_NAME}")
        self._stopping = threading.Event()

    def try_acquire(self) -> bool:
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "renewTime": micro_time(),
        }
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": LEASE_NAME}, "spec": spec | {"acquireTime": micro_time()}}
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
            patch["spec"] = spec | {"acquireTime": micro_time()}
        try:
            self.coordination.patch_namespaced_lease(LEASE_NAME, self.namespace, patch)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Hand the Lease back on a clean stop so that a standby need not wait it out."""
        self._stopping.set()
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                version = lease.metadata.resource_version if lease.metadata else None
                patch = {
                    "metadata": {"resourceVersion": version},
                    "spec": {"holderIdentity": None, "renewTime": None},
                }
                self.coordination.patch_namespaced_lease(LEASE_NAME, self.namespace, patch)
                self.log.info("released leadership")
        except (ApiException, OSError) as exc:
            self.log.warning("could not release the lease; it expires by itself", error=str(exc))

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
        while not self._stopping.wait(interval):
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
