"""Fixtures for the flist tests: generated trees, tree comparison, stores, real FUSE mounts."""

from __future__ import annotations

import functools
import http.server
import os
import random
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.flist.mount import mount_command, unmount, wait_mounted
from hack.controlplane import free_port
from tests.flist.fake_zdb import FakeZdb

MTIME = 1_700_000_000  # flists keep whole seconds
TOKEN = "t0ken-for-alice"  # start_hub's static token


def needs_fuse() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
    )


def make_tree(root: Path, files: int = 40, large: tuple[int, ...] = (), seed: int = 1) -> Path:
    """A tree with every entry type an flist must keep: nested dirs, many small files, large
    files (not multiples of the chunk size), empty files, odd modes and owners, symlinks (to
    files, dirs, absolute, dangling), hard links, a fifo and device nodes. Whole-second mtimes."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    dirs = [root]
    for i in range(max(files // 25, 1)):
        parent = rng.choice(dirs)
        child = parent / f"dir{i}"
        child.mkdir()
        dirs.append(child)
    for i in range(files):
        path = rng.choice(dirs) / f"file{i}.txt"
        path.write_bytes(rng.randbytes(rng.randrange(0, 3000)))
        path.chmod(rng.choice([0o644, 0o600, 0o755, 0o4755, 0o640]))
        os.chown(path, rng.randrange(0, 3000), rng.randrange(0, 3000))
    for i, size in enumerate(large):
        (root / f"large{i}.bin").write_bytes(rng.randbytes(size))
    (root / "empty").touch()
    (root / "sub").mkdir()
    (root / "sub" / "deep").mkdir()
    (root / "sub" / "deep" / "data").write_bytes(b"deep data\n" * 100)
    os.symlink("deep/data", root / "sub" / "rel-link")
    os.symlink("/sub/deep", root / "abs-dir-link")
    os.symlink("missing-target", root / "dangling")
    os.link(root / "sub" / "deep" / "data", root / "hardlink-to-data")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(root / "socket", 0o755 | stat.S_IFSOCK)
    os.chown(root / "dangling", 33, 44, follow_symlinks=False)
    os.chown(root / "sub", 1000, 1001)
    (root / "sub").chmod(0o1777)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (MTIME, MTIME + rng.randrange(0, 10**6)), follow_symlinks=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What must survive a round trip, per relative path (dir sizes are fs-specific: skipped)."""
    result: dict[str, tuple[object, ...]] = {}
    names: dict[int, list[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(Path(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                names.setdefault(st.st_ino, []).append(str(Path(dirpath, name).relative_to(root)))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, *([""] if dirpath == str(root) else [])]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if kind == stat.S_IFREG:
                extra = path.read_bytes()
                if st.st_nlink > 1:  # every path sharing the inode
                    extra = (extra, tuple(sorted(names[st.st_ino])))
            elif kind == stat.S_IFLNK:
                extra = os.readlink(path)
            size = None if kind == stat.S_IFDIR else st.st_size
            result[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                int(st.st_mtime),
                size,
                st.st_rdev,
                st.st_nlink if kind == stat.S_IFREG else None,
                extra,
            )
    return result


def assert_same_tree(expected: Path, actual: Path) -> None:
    want, got = snapshot(expected), snapshot(actual)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``zmachine-flist ARGS`` in a child process (what a user runs), output captured."""
    done = subprocess.run(
        [sys.executable, "-m", "controller.flist.cli", *args],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    if check and done.returncode:
        raise AssertionError(f"zmachine-flist {' '.join(args)}: {done.stderr}")
    return done


@pytest.fixture
def fake_zdb() -> Iterator[FakeZdb]:
    server = FakeZdb().start()
    yield server
    server.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_dir() -> Iterator[Callable[[Path], tuple[str, list[str]]]]:
    """Serve a directory over HTTP on 127.0.0.1; returns (base URL, list of request paths)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(directory: Path) -> tuple[str, list[str]]:
        requests: list[str] = []
        handler = type("Handler", (_QuietHandler,), {"requests": requests})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class Mounted:
    def __init__(self, process: subprocess.Popen[bytes], mountpoint: Path, log: Path) -> None:
        self.process = process
        self.mountpoint = mountpoint
        self.log = log

    def stop(self) -> None:
        unmount(self.mountpoint)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def mount_flist(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """Spawn the real mount command (as the agent does) and wait for the mount."""
    mounts: list[Mounted] = []

    def start(flist: Path, stores: tuple[str, ...] = (), cache: Path | None = None) -> Mounted:
        mountpoint = tmp_path / f"mnt{len(mounts)}"
        mountpoint.mkdir()
        log = tmp_path / f"mount{len(mounts)}.log"
        argv = mount_command(flist, mountpoint, cache or tmp_path / "cache", stores)
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        mounted = Mounted(process, mountpoint, log)
        mounts.append(mounted)
        try:
            wait_mounted(mountpoint, timeout=20)
        except Exception:
            mounted.stop()
            raise AssertionError(log.read_text()) from None
        return mounted

    yield start
    for mounted in mounts:
        mounted.stop()


@dataclass
class RunningHub:
    """A zmachine-hub process (start_hub)."""

    url: str
    root: Path
    token_file: Path
    process: subprocess.Popen[bytes]


def start_hub(tmp_path: Path, *auth: str, max_upload_mib: int = 64) -> RunningHub:
    """A real zmachine-hub on loopback, its root and log under ``tmp_path``; alice's token
    (``TOKEN``) in ``token_file``."""
    port = free_port()
    token_file = tmp_path / "alice.token"
    token_file.write_text(TOKEN + "\n")
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "controller.flist.hub", "--root", str(tmp_path / "hub")]
    argv += ["--listen", f"127.0.0.1:{port}", "--public-url", url, *auth]
    argv += ["--max-upload-mib", str(max_upload_mib)]
    log = (tmp_path / "hub.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2).close()
            return RunningHub(url, tmp_path / "hub", token_file, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError((tmp_path / "hub.log").read_text()) from None
            time.sleep(0.2)


def stop_hub(hub: RunningHub) -> None:
    hub.process.terminate()
    hub.process.wait(timeout=30)
