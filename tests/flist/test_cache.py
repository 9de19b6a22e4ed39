"""The block cache: one download per block however many readers want it at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from controller.flist.cache import BlockCache
from controller.flist.chunks import CHUNK_SIZE, encode_v2
from controller.flist.stores import DirStore, Router

HttpDir = Callable[[Path], tuple[str, list[str]]]


def test_concurrent_readers_share_one_download(tmp_path: Path, http_dir: HttpDir) -> None:
    store = DirStore(f"dir://{tmp_path / 'store'}")
    refs = []
    for i in range(3):
        ref, stored = encode_v2(bytes([i]) * CHUNK_SIZE)
        store.set(ref.id, stored)
        refs.append(ref)
    url, requests = http_dir(tmp_path / "store")
    cache = BlockCache(Router.from_specs([url]), tmp_path / "cache", "test", memory_chunks=1)
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def reader() -> None:
        barrier.wait()
        results.extend(cache.get(ref) for ref in refs)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted([bytes([i]) * CHUNK_SIZE for i in range(3)] * 8)
    assert sorted(requests) == sorted(f"/{r.id.hex()}" for r in refs)
    assert cache.fetched == 3
    # A second cache over the same directory finds every block on disk: no request at all.
    again = BlockCache(Router.from_specs([url]), tmp_path / "cache", "test")
    assert again.read(refs, 3 * CHUNK_SIZE, CHUNK_SIZE - 1, 2) == b"\x00\x01"
    assert again.fetched == 0 and len(requests) == 3
    cache.close()
    again.close()
