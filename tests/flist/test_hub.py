"""zmachine-hub (a real process on loopback) and ``zmachine-flist push``: upload with a bearer
token, pack into the hub's store, serve flists and blocks over HTTP, list; refusals."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.flist.cache import BlockCache
from controller.flist.fetch import fetch_flist
from controller.flist.meta import open_flist
from controller.flist.stores import Router
from controller.flist.unpack import unpack
from hack.controlplane import ControlPlane
from tests.flist.conftest import (
    MTIME,
    TOKEN,
    RunningHub,
    assert_same_tree,
    make_tree,
    run_cli,
    start_hub,
    stop_hub,
)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[RunningHub]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# token user\n{TOKEN} alice\nother-token bob\n")
    running = start_hub(tmp_path, "--token-file", str(tokens))
    yield running
    stop_hub(running)


def _rootfs_tar_gz(source: Path, path: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(source, arcname=".")
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        data: bytes = response.read()
        return data


def test_push_then_boot_the_flist_from_the_hub(hub: RunningHub, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", files=50, large=(1_300_000,))
    (source / "socket").unlink()  # tar has no sockets
    os.utime(source, (MTIME, MTIME))
    archive = _rootfs_tar_gz(source, tmp_path / "Debian 12.tar.gz")
    pushed = run_cli("push", str(archive), "--hub", hub.url, "--token-file", str(hub.token_file))
    flist_url = f"{hub.url}/alice/debian-12.fl"
    assert pushed.stdout.strip() == flist_url
    assert "100.0%" in pushed.stderr  # the progress bar reached the end
    assert not list((hub.root / "uploads").iterdir())  # the upload is gone once packed
    # A reader needs nothing but the flist URL: the route points at the hub's blocks.
    local = fetch_flist(flist_url, tmp_path / "fl-cache")
    with open_flist(local) as flist:
        assert flist.store_specs() == [f"00-ff={hub.url}/blocks"]
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")
    listing = json.loads(_get(f"{hub.url}/api/flists"))
    assert [(e["user"], e["name"], e["url"]) for e in listing] == [
        ("alice", "debian-12", flist_url)
    ]
    assert json.loads(_get(f"{hub.url}/api/flists/bob")) == []
    block = next(p.name for p in (hub.root / "blocks").iterdir())
    assert _get(f"{hub.url}/blocks/{block[:2]}/{block}") == _get(f"{hub.url}/blocks/{block}")


def test_refusals(hub: RunningHub, tmp_path: Path) -> None:
    archive = _rootfs_tar_gz(make_tree(tmp_path / "src", files=5), tmp_path / "small.tar.gz")
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-a-token")
    denied = run_cli(
        "push", str(archive), "--hub", hub.url, "--token-file", str(wrong), "-q", check=False
    )
    assert denied.returncode == 1 and "HTTP 401" in denied.stderr
    no_token = run_cli("push", str(archive), "--hub", hub.url, "-q", check=False)
    assert no_token.returncode == 1 and "ZMACHINE_HUB_TOKEN" in no_token.stderr
    bad_name = run_cli(
        "push", str(archive), "--hub", hub.url, "--token-file", str(hub.token_file),
        "--name", "../../etc", "-q", check=False,
    )  # fmt: skip
    assert bad_name.returncode == 1 and "HTTP 4" in bad_name.stderr
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(2000))
    refused = run_cli(
        "push", str(junk), "--hub", hub.url, "--token-file", str(hub.token_file), "-q", check=False
    )
    assert refused.returncode == 1 and "HTTP 400" in refused.stderr
    assert "cannot pack the upload: bad tar archive" in refused.stderr
    big = tmp_path / "big.tar"
    with big.open("wb") as handle:
        handle.truncate(65 << 20)  # over --max-upload-mib 64
    too_big = run_cli(
        "push", str(big), "--hub", hub.url, "--token-file", str(hub.token_file), "-q", check=False
    )
    assert too_big.returncode == 1 and "413" in too_big.stderr
    for path in ("/blocks/..%2F..%2Fetc%2Fpasswd", "/alice/..%2Fx.fl", "/blocks/ab/cd" + "0" * 62):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(hub.url + path)
        assert info.value.code == 404
    assert not list((hub.root / "flists").rglob("*.fl"))
    assert not list((hub.root / "uploads").iterdir())
    assert hub.process.poll() is None


def test_service_account_tokens_through_token_review(
    cluster: ControlPlane, ns: str, tmp_path: Path
) -> None:
    """In a cluster: a ServiceAccount token for the hub's audience uploads as
    <namespace>.<name>; the hub's own identity needs only system:auth-delegator."""
    binding = f"zm-hub-test-{os.getpid()}"
    cluster.kubectl("create", "serviceaccount", "uploader", "-n", ns)
    cluster.kubectl(
        "create", "clusterrolebinding", binding, "--clusterrole=system:auth-delegator",
        f"--user={binding}",
    )  # fmt: skip
    hub_config = cluster.user_kubeconfig(binding, [])
    hub = start_hub(
        tmp_path, "--token-review", "--audience", "zmachine-hub", "--kubeconfig", str(hub_config)
    )
    try:
        archive = _rootfs_tar_gz(make_tree(tmp_path / "src", files=5), tmp_path / "sa.tar.gz")

        def push_with(*token_args: str) -> subprocess.CompletedProcess[str]:
            token = cluster.kubectl("create", "token", "uploader", "-n", ns, *token_args)
            hub.token_file.write_text(token.stdout.strip())
            push = ["push", str(archive), "--hub", hub.url, "--token-file", str(hub.token_file)]
            return run_cli(*push, "-q", check=False)

        accepted = push_with("--audience", "zmachine-hub")
        assert accepted.stdout.strip() == f"{hub.url}/{ns}.uploader/sa.fl", accepted.stderr
        other_audience = push_with()  # the API server's default audience, not the hub's
        assert other_audience.returncode == 1 and "HTTP 401" in other_audience.stderr
        cluster.kubectl("delete", "clusterrolebinding", binding)
        # Without TokenReview rights the hub cannot vouch for anyone.
        deadline = time.monotonic() + 30
        while (refused := push_with("--audience", "zmachine-hub")).returncode == 0:
            assert time.monotonic() < deadline, "upload still accepted without TokenReview rights"
            time.sleep(1)
        assert "HTTP 503" in refused.stderr and "cannot check tokens" in refused.stderr
    finally:
        stop_hub(hub)
        cluster.kubectl("delete", "clusterrolebinding", binding, check=False)
