"""Leader election through a coordination.k8s.io Lease, with client-go's semantics.

- leaseDuration: how long a candidate waits, by its own monotonic clock since it last saw
  the Lease record change (observedTime), before it may take the Lease over.
- renewDeadline (< leaseDuration): a leader that has not renewed successfully within this
  long of its last successful renewal's start stops acting: the whole process exits, before
  any candidate can have taken over.
- retryPeriod: the pause between attempts, for candidates and for the leader's renewals.

Every error (API status, refused connection, timeout, anything) is a failed attempt. The
deadline is also enforced in front of every API request the process makes (`LeaseFence`),
so a leader frozen past its Lease and then thawed writes nothing: see docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
from kubernetes import client

from controller.kube import ApiException, LeaseObserver, micro_time

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

LEASE_NAME = "zmachine-controller"
# The process exits with this code when it stops leading without being asked to.
LOST_LEADERSHIP_EXIT = 3


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


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's three durations, in seconds (the chart's defaults)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        # The same rules as client-go's NewLeaderElector; the margin between renewDeadline
        # and leaseDuration is what absorbs clock-rate drift and scheduling delay.
        if self.retry_period <= 0:
            raise ValueError(f"retry period must be positive, got {self.retry_period}")
        if self.renew_deadline <= self.retry_period * 1.2:
            raise ValueError(
                f"renew deadline ({self.renew_deadline}s) must exceed 1.2 x retry period"
                f" ({self.retry_period}s)"
            )
        if self.lease_duration <= self.renew_deadline:
            raise ValueError(
                f"lease duration ({self.lease_duration}s) must exceed renew deadline"
                f" ({self.renew_deadline}s)"
            )


def exit_now(reason: str, **details: object) -> None:
    """Stop the process at once: no handler, no finalizer, no further API request may run
    once leadership is in doubt. The log line is flushed first (the handler flushes)."""
    log.error(reason, **details)
    os._exit(LOST_LEADERSHIP_EXIT)


class LeaseFence:
    """The leader's right to act, by monotonic clock: until `deadline`, the start of the
    last successful renewal plus renewDeadline. Checked in front of every API request."""

    def __init__(self, renew_deadline: float) -> None:
        self.renew_deadline = renew_deadline
        self._deadline = 0.0  # not leading yet
        self._lock = threading.Lock()

    @property
    def deadline(self) -> float:
        return self._deadline

    def renewed(self, attempt_started: float) -> None:
        with self._lock:
            self._deadline = max(self._deadline, attempt_started + self.renew_deadline)

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    def check(self, method: str, url: str) -> None:
        """Exit instead of sending a request once the deadline has passed."""
        late = -self.remaining()
        if late >= 0:
            exit_now(
                "leadership lapsed (not renewed within renewDeadline); exiting before any request",
                method=method,
                url=url,
                late_seconds=round(late, 3),
            )


class LeaderElector:
    def __init__(
        self, api: client.ApiClient, namespace: str, timing: LeaseTiming | None = None
    ) -> None:
        """`api` must be a client of the elector's own: the fence does not guard it."""
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.timing = timing or LeaseTiming()
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log = log.bind(identity=self.identity, lease=f"{namespace}/{LEASE_NAME}")
        self.fence = LeaseFence(self.timing.renew_deadline)
        self.observer = LeaseObserver()
        self._stopping = threading.Event()
        # One attempt at a time: release() must not race a renewal that would retake the Lease.
        self._attempt = threading.Lock()

    def try_acquire_or_renew(self, timeout: float) -> bool:
        """One attempt; True when we hold the Lease now. API errors propagate."""
        started = time.monotonic()
        deadline = started + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        duration = int(self.timing.lease_duration)
        now = micro_time()
        try:
            lease = self.coordination.read_namespaced_lease(
                LEASE_NAME, self.namespace, _request_timeout=left()
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": LEASE_NAME},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            try:
                created = self.coordination.create_namespaced_lease(
                    self.namespace,
                    body,  # type: ignore[arg-type]
                    _request_timeout=left(),
                )
            except ApiException as create_exc:
                if create_exc.status == 409:  # another replica was faster
                    return False
                raise
            self.observer.observe(created, started)
            self.fence.renewed(started)
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        if holder and holder != self.identity and not self.observer.expired(lease):
            return False
        patch_spec: dict[str, object] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": duration,
            "renewTime": now,
        }
        if holder != self.identity:
            patch_spec["acquireTime"] = now
            patch_spec["leaseTransitions"] = (spec.lease_transitions or 0) + 1
        # resourceVersion makes the takeover atomic: a concurrent writer gets a 409.
        version = lease.metadata.resource_version if lease.metadata else None
        patch = {"metadata": {"resourceVersion": version}, "spec": patch_spec}
        try:
            written = self.coordination.patch_namespaced_lease(
                LEASE_NAME, self.namespace, patch, _request_timeout=left()
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        self.observer.observe(written, started)
        self.fence.renewed(started)
        return True

    def acquire(self) -> None:
        """Block until we lead; every failure is only a reason to try again."""
        announced = False
        while True:
            try:
                if self.try_acquire_or_renew(self.timing.renew_deadline):
                    break
                if not announced:
                    self.log.info("another controller leads; standing by")
                    announced = True
            except Exception as exc:  # every error is a failed attempt, by design
                self.log.warning("could not read or take the lease; retrying", error=repr(exc))
            time.sleep(self._jittered())
        self.log.info("became leader", **self._timing_fields())

    def keep(self) -> threading.Thread:
        thread = threading.Thread(target=self._renew_loop, name="leader-renew", daemon=True)
        thread.start()
        return thread

    def _renew_loop(self) -> None:
        while not self._stopping.wait(min(self.timing.retry_period, self.fence.remaining())):
            remaining = self.fence.remaining()
            if remaining <= 0:
                exit_now("could not renew the lease within renewDeadline; exiting")
            try:
                with self._attempt:
                    if self._stopping.is_set():
                        return
                    if self.try_acquire_or_renew(remaining):
                        continue
                exit_now("lost leadership to another controller; exiting")
            except Exception as exc:  # every error is a failed renewal, by design
                self.log.warning(
                    "lease renewal failed; retrying",
                    error=repr(exc),
                    seconds_left=round(self.fence.remaining(), 1),
                )

    def release(self) -> None:
        """Hand the Lease back on a clean stop so that a standby need not wait it out."""
        self._stopping.set()
        with self._attempt:
            self._release()

    def _release(self) -> None:
        if self.fence.remaining() <= 0:
            return  # not ours any more to hand back
        try:
            lease = self.coordination.read_namespaced_lease(
                LEASE_NAME, self.namespace, _request_timeout=self.fence.remaining()
            )
            if lease.spec and lease.spec.holder_identity == self.identity:
                version = lease.metadata.resource_version if lease.metadata else None
                patch = {
                    "metadata": {"resourceVersion": version},
                    # As client-go: no holder and a 1 s duration let a candidate take it now.
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
                }
                self.coordination.patch_namespaced_lease(
                    LEASE_NAME, self.namespace, patch, _request_timeout=self.fence.remaining()
                )
                self.log.info("released leadership")
        except Exception as exc:  # the Lease expires by itself; nothing else to do
            self.log.warning("could not release the lease; it expires by itself", error=repr(exc))

    def _jittered(self) -> float:
        """client-go's jitter (factor 1.2) keeps candidates from polling in lockstep."""
        return self.timing.retry_period * (1 + 0.2 * random.random())

    def _timing_fields(self) -> dict[str, float]:
        return {
            "lease_duration": self.timing.lease_duration,
            "renew_deadline": self.timing.renew_deadline,
            "retry_period": self.timing.retry_period,
        }
