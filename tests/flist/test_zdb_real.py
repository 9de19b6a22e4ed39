"""The zdb store against a real 0-db (opt-in: needs ``zdb`` on PATH, built from
github.com/threefoldtech/0-db; CI runs the same store tests against fake_zdb)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from controller.flist.cache import BlockCache
from controller.flist.chunks import CHUNK_SIZE
from controller.flist.errors import StoreError
from controller.flist.meta import open_flist
from controller.flist.pack import pack
from controller.flist.stores import Router, ZdbStore
from controller.flist.unpack import unpack
from hack.controlplane import free_port
from tests.flist.conftest import assert_same_tree, make_tree

ZDB = shutil.which("zdb")
pytestmark = pytest.mark.skipif(
    ZDB is None, reason="zdb (0-db, built from github.com/threefoldtech/0-db) is not on PATH"
)
ADMIN = "admin-pw"


@dataclass
class RealZdb:
    port: int
    socket: Path
    process: subprocess.Popen[bytes]
    argv: list[str]

    def admin(self, *command: str) -> None:
        """One command on an admin connection (0-db's AUTH, then e.g. NSNEW)."""
        with redis.Redis(port=self.port, protocol=2, driver_info=None) as client:
            client.execute_command("AUTH", ADMIN)
            client.execute_command(*command)

    def restart(self) -> None:
        self.stop()
        self.process = _start(self.argv, self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert process.poll() is None, "zdb exited at start"
            time.sleep(0.1)
    process.kill()
    raise AssertionError("zdb did not listen within 30 s")


@pytest.fixture
def real_zdb(tmp_path: Path) -> Iterator[RealZdb]:
    port = free_port()
    sock = tmp_path / "zdb.sock"
    assert ZDB is not None
    argv = [ZDB, "--mode", "user", "--listen", "127.0.0.1", "--port", str(port)]
    argv += ["--dualnet", "--socket", str(sock), "--admin", ADMIN]
    argv += ["--data", str(tmp_path / "data"), "--index", str(tmp_path / "index")]
    server = RealZdb(port, sock, _start(argv, port), argv)
    yield server
    server.stop()


def test_pack_and_unpack_through_a_real_0db(real_zdb: RealZdb, tmp_path: Path) -> None:
    real_zdb.admin("NSNEW", "flists")
    real_zdb.admin("NSSET", "flists", "password", "s3cret")
    real_zdb.admin("NSSET", "flists", "public", "1")
    source = make_tree(tmp_path / "src", files=40, large=(CHUNK_SIZE * 2 + 5,))
    url = f"zdb://:s3cret@127.0.0.1:{real_zdb.port}/flists"
    first = pack(source, tmp_path / "t.fl", [url])
    assert first.blocks_written == first.blocks > 0
    again = pack(source, tmp_path / "t2.fl", [url])
    assert again.blocks_written == 0  # EXISTS answered for every block
    with open_flist(tmp_path / "t.fl") as flist:
        # The route has no password: a public namespace reads without it.
        assert flist.store_specs() == [f"00-ff=zdb://127.0.0.1:{real_zdb.port}/flists"]
        cache = BlockCache(Router.from_specs(flist.store_specs()), None, flist.label)
        unpack(flist, cache, tmp_path / "out")
        cache.close()
    assert_same_tree(source, tmp_path / "out")
    reader = ZdbStore(f"zdb://127.0.0.1:{real_zdb.port}/flists")
    with pytest.raises(StoreError, match="SET"):
        reader.set(b"k" * 32, b"no password, no write")
    reader.close()
    wrong = ZdbStore(f"zdb://:wrong@127.0.0.1:{real_zdb.port}/flists")
    with pytest.raises(StoreError, match="GET"):
        wrong.get(b"k" * 32)
    wrong.close()
    with pytest.raises(StoreError, match="GET"):
        ZdbStore(f"zdb://127.0.0.1:{real_zdb.port}/missing").get(b"k" * 32)


def test_unix_socket_and_a_restarting_server(real_zdb: RealZdb) -> None:
    store = ZdbStore(f"zdb://{real_zdb.socket}")
    block = b"\x01" * 32
    store.set(block, b"payload")
    tcp = ZdbStore(f"zdb://127.0.0.1:{real_zdb.port}")
    assert tcp.get(block) == b"payload" and tcp.exists(block)
    real_zdb.restart()  # every pooled connection is now dead; the data is on disk
    assert tcp.get(block) == b"payload"
    assert store.get(block) == b"payload"
    assert tcp.get(b"\x02" * 32) is None and not tcp.exists(b"\x02" * 32)
    tcp.close()
    store.close()
    real_zdb.stop()
    with pytest.raises(StoreError, match="cannot connect"):
        ZdbStore(f"zdb://127.0.0.1:{real_zdb.port}").get(block)
    real_zdb.process = _start(real_zdb.argv, real_zdb.port)  # for the fixture's teardown
