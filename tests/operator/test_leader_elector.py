"""The elector against the real API server: client-go's observedTime, renewDeadline and
resourceVersion semantics, and what an unreachable API server does to a leader."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from controller.kube import ApiException, api_client, micro_time
from controller.operator.leader import (
    LEASE_NAME,
    LOST_LEADERSHIP_EXIT,
    LeaderElector,
    LeaseTiming,
)
from controller.operator.main import main as controller_main
from hack.controlplane import ControlPlane, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lease_ns(cluster: ControlPlane) -> Iterator[str]:
    """A namespace per test: each starts with no Lease."""
    name = f"lease-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false")


def coordination(cluster: ControlPlane) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api_client(str(cluster.kubeconfig)))


def write_foreign_lease(cluster: ControlPlane, ns: str, renew_time: str, duration: int) -> None:
    """A Lease held by a replica that is not in this test, renewed at `renew_time`."""
    body = {
        "metadata": {"name": LEASE_NAME},
        "spec": {
            "holderIdentity": "elsewhere",
            "leaseDurationSeconds": duration,
            "renewTime": renew_time,
        },
    }
    coordination(cluster).create_namespaced_lease(ns, body)  # type: ignore[arg-type]


def lease_spec(cluster: ControlPlane, ns: str) -> client.V1LeaseSpec:
    spec = coordination(cluster).read_namespaced_lease(LEASE_NAME, ns).spec
    assert spec is not None
    return spec


def renew_foreign_lease(cluster: ControlPlane, ns: str) -> None:
    patch = {"spec": {"renewTime": micro_time()}}
    coordination(cluster).patch_namespaced_lease(LEASE_NAME, ns, patch)


def elector(cluster: ControlPlane, ns: str, timing: LeaseTiming) -> LeaderElector:
    return LeaderElector(api_client(str(cluster.kubeconfig)), ns, timing)


SHORT = LeaseTiming(lease_duration=3, renew_deadline=2, retry_period=0.5)


@pytest.mark.parametrize(
    "renew_time",
    ["2001-01-01T00:00:00.123456Z", "2099-01-01T00:00:00.123456Z"],
    ids=["renewTime-in-the-past", "renewTime-in-the-future"],
)
def test_expiry_is_judged_by_our_own_clock_since_the_record_changed(
    cluster: ControlPlane, lease_ns: str, renew_time: str
) -> None:
    """The holder's clock may be years off ours: its renewTime says nothing to us. The Lease
    is free only once its record has stayed unchanged for its duration by our clock."""
    write_foreign_lease(cluster, lease_ns, renew_time, duration=3)
    candidate = elector(cluster, lease_ns, SHORT)
    first_seen = time.monotonic()
    assert not candidate.try_acquire_or_renew(5)
    while time.monotonic() - first_seen < 2.5:
        assert not candidate.try_acquire_or_renew(5), "took a Lease that was not expired"
        time.sleep(0.25)
    time.sleep(max(0.0, first_seen + 3.1 - time.monotonic()))
    assert candidate.try_acquire_or_renew(5)
    spec = lease_spec(cluster, lease_ns)
    assert spec.holder_identity == candidate.identity
    assert spec.lease_transitions == 1


def test_a_renewed_lease_is_never_taken(cluster: ControlPlane, lease_ns: str) -> None:
    """Each change of the record restarts the wait, whatever its renewTime says."""
    write_foreign_lease(cluster, lease_ns, "2001-01-01T00:00:00.123456Z", duration=2)
    candidate = elector(cluster, lease_ns, LeaseTiming(2, 1.5, 0.5))
    until = time.monotonic() + 6
    while time.monotonic() < until:
        assert not candidate.try_acquire_or_renew(5), "took a Lease its holder renews"
        renew_foreign_lease(cluster, lease_ns)
        time.sleep(0.5)


def test_takeover_is_atomic(cluster: ControlPlane, lease_ns: str) -> None:
    """Candidates that all see the Lease expire at once: exactly one gets it (the others'
    writes carry a stale resourceVersion and are refused with 409)."""
    write_foreign_lease(cluster, lease_ns, micro_time(), duration=1)
    candidates = [elector(cluster, lease_ns, LeaseTiming(1, 0.8, 0.2)) for _ in range(6)]
    for c in candidates:
        assert not c.try_acquire_or_renew(5)
    time.sleep(1.2)
    start = threading.Barrier(len(candidates))
    won: dict[str, bool] = {}

    def race(c: LeaderElector) -> None:
        start.wait()
        won[c.identity] = c.try_acquire_or_renew(5)

    threads = [threading.Thread(target=race, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [identity for identity, ok in won.items() if ok]
    assert len(won) == len(candidates)
    assert len(winners) == 1, f"{len(winners)} candidates believe they lead: {winners}"
    assert lease_spec(cluster, lease_ns).holder_identity == winners[0]


def test_a_stale_resource_version_is_refused(cluster: ControlPlane, lease_ns: str) -> None:
    """The precondition itself: a write based on an older read of the Lease gets 409."""
    candidate = elector(cluster, lease_ns, SHORT)
    assert candidate.try_acquire_or_renew(5)
    api = coordination(cluster)
    seen = api.read_namespaced_lease(LEASE_NAME, lease_ns).metadata
    assert seen is not None
    assert candidate.try_acquire_or_renew(5)  # a renewal moves resourceVersion on
    stale = {"metadata": {"resourceVersion": seen.resource_version}, "spec": {}}
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_lease(LEASE_NAME, lease_ns, stale)
    assert refused.value.status == 409


def test_a_leader_that_cannot_reach_the_api_server_exits_within_renew_deadline(
    cluster: ControlPlane, lease_ns: str, tmp_path: Path
) -> None:
    """Connection refused (urllib3's MaxRetryError, no ApiException and no OSError) is a
    failed renewal like any other: the renew thread survives it, keeps trying every retry
    period, and ends the process once renewDeadline has passed: before the Lease expires
    for anyone else."""
    timing = LeaseTiming(lease_duration=6, renew_deadline=4, retry_period=1)
    log = tmp_path / "child.log"
    argv = [
        sys.executable, "-m", "tests.operator.elector_child", "leader",
        "--kubeconfig", str(cluster.kubeconfig), "--namespace", lease_ns,
        "--unreachable", f"https://127.0.0.1:{free_port()}",
        "--timing", str(timing.lease_duration), str(timing.renew_deadline),
        str(timing.retry_period),
    ]  # fmt: skip
    with log.open("wb") as err:
        child = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, env={**os.environ}
        )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"leading\n", log.read_text()
        leading = time.monotonic()
        code = child.wait(timeout=timing.lease_duration + 10)
        waited = time.monotonic() - leading
    finally:
        child.kill()
        child.wait()
    text = log.read_text()
    assert code == LOST_LEADERSHIP_EXIT, text
    assert text.count("lease renewal failed; retrying") >= 2, text
    assert "could not renew the lease within renewDeadline" in text
    # It led until its last renewal plus renewDeadline, and stopped before the Lease
    # (renewed no later than `leading`) could expire for a standby.
    assert timing.renew_deadline - timing.retry_period <= waited < timing.lease_duration, waited


@pytest.mark.parametrize("via", ["aiohttp", "kubernetes"])
def test_the_fence_stops_a_request_sent_after_the_deadline(via: str) -> None:
    """In front of kopf's session (aiohttp) and of our kubernetes client: a request due
    after the deadline ends the process before anything reaches the server."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        url = f"https://127.0.0.1:{server.getsockname()[1]}"
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.operator.elector_child", "fenced", "--url", url,
             "--via", via],
            cwd=REPO, stderr=subprocess.PIPE,
        )  # fmt: skip
        connected = False
        deadline = time.monotonic() + 30
        while not connected and time.monotonic() < deadline:
            exited = child.poll() is not None
            with contextlib.suppress(TimeoutError):
                server.accept()[0].close()
                connected = True
            if exited:  # one last look at the backlog after it ended
                break
        child.kill()
        _, err = child.communicate()
    assert not connected, "a request reached the server after the deadline"
    assert child.returncode == LOST_LEADERSHIP_EXIT, err.decode()
    assert b"leadership lapsed" in err


def test_lease_timing_follows_client_go_rules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad:
        controller_main(
            ["--agent-insecure-dev", "--leader-elect-lease-duration=10",
             "--leader-elect-renew-deadline=10"]
        )  # fmt: skip
    assert bad.value.code == 2
    assert "lease duration (10.0s) must exceed renew deadline (10.0s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"must exceed 1\.2 x retry period"):
        LeaseTiming(lease_duration=15, renew_deadline=2, retry_period=2)
