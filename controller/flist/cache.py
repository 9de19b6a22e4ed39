"""Block fetching with an rfs-layout plaintext cache: ``<cache>/<hex[0:2]>/<hex[2:4]>/<hex id>``.

Every chunk is checked against its key whether it comes from a store or from the cache (a
truncated or damaged cache file is dropped and fetched again). Concurrent readers of the same
block share one download. A small in-memory LRU serves the repeated FUSE reads of one chunk.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from controller.flist import chunks
from controller.flist.chunks import CHUNK_SIZE, BlockRef
from controller.flist.errors import BlockError, StoreError
from controller.flist.stores import Router, write_atomic

log = structlog.get_logger(__name__)


class BlockCache:
    def __init__(
        self, router: Router, cache_dir: Path | None, label: str, memory_chunks: int = 16
    ) -> None:
        self.router = router
        self.cache_dir = cache_dir
        self.label = label
        self.memory_chunks = memory_chunks
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flist-prefetch")
        self.fetched = 0  # blocks that came from a store (for tests and stats)

    def path_for(self, ref: BlockRef) -> Path | None:
        if self.cache_dir is None:
            return None
        name = ref.id.hex()
        return self.cache_dir / name[:2] / name[2:4] / name

    def get(self, ref: BlockRef, path: str | None = None) -> bytes:
        """Plaintext of one chunk; :class:`BlockError` if no store serves a valid copy."""
        with self._lock:
            data = self._memory.get(ref.id)
            if data is not None:
                self._memory.move_to_end(ref.id)
                return data
            future = self._inflight.get(ref.id)
            owner = future is None
            if future is None:
                future = self._inflight[ref.id] = Future()
        if not owner:
            return future.result()
        try:
            data = self._load(ref, path)
        except BaseException as exc:
            future.set_exception(exc)
            with self._lock:
                del self._inflight[ref.id]
            raise
        future.set_result(data)
        with self._lock:
            del self._inflight[ref.id]
            self._memory[ref.id] = data
            while len(self._memory) > self.memory_chunks:
                self._memory.popitem(last=False)
        return data

    def _load(self, ref: BlockRef, path: str | None) -> bytes:
        cached = self.path_for(ref)
        if cached is not None:
            try:
                data = cached.read_bytes()
            except OSError:
                data = None
            if data is not None:
                if chunks.key_matches(data, ref.key):
                    return data
                log.warning("dropping damaged cache file", block=ref.id.hex(), flist=self.label)
                cached.unlink(missing_ok=True)
        try:
            data = chunks.decode(self.router.get(ref.id, path), ref)
        except BlockError as exc:
            raise type(exc)(exc.reason, flist=self.label, path=path) from None
        self.fetched += 1
        if cached is not None:
            try:
                write_atomic(cached, data)
            except StoreError as exc:  # a full or read-only cache must not fail the read
                log.warning("cannot cache block", error=str(exc), flist=self.label)
        return data

    def prefetch(self, ref: BlockRef, path: str | None = None) -> None:
        """Start fetching a block in the background (errors surface on the real read)."""
        with self._lock:
            if ref.id in self._memory or ref.id in self._inflight:
                return
        self._prefetcher.submit(self._quiet_get, ref, path)

    def _quiet_get(self, ref: BlockRef, path: str | None) -> None:
        with contextlib.suppress(BlockError):
            self.get(ref, path)

    def read_from_memory(
        self, refs: list[BlockRef], size: int, offset: int, length: int
    ) -> bytes | None:
        """Like :meth:`read` when every chunk needed is in memory (no I/O, no thread); else None.

        The kernel reads a chunk in several pieces, so most FUSE reads are answered here."""
        with self._lock:
            return _assemble(refs, size, offset, length, self._memory.get)

    def read(
        self, refs: list[BlockRef], size: int, offset: int, length: int, path: str | None = None
    ) -> bytes:
        """Bytes [offset, offset+length) of a file made of ``refs`` with total ``size``.

        A file whose blocks do not cover its size (rfs never writes one, but it serves them)
        reads short where its data ends: after its last block, or after a block shorter than a
        full chunk. Blocks beyond the size are never read.
        """
        by_id = {ref.id: ref for ref in refs}
        data = _assemble(
            refs, size, offset, length, lambda block_id: self.get(by_id[block_id], path)
        )
        assert data is not None  # get() returns data or raises
        end = min(size, offset + length)
        following = -(-end // CHUNK_SIZE)
        whole = len(data) == end - offset  # else the data ended here: nothing follows
        if whole and following < len(refs) and following * CHUNK_SIZE < size:
            self.prefetch(refs[following], path)
        return data

    def file_chunks(
        self, refs: list[BlockRef], size: int, path: str | None = None
    ) -> Iterator[bytes]:
        """A whole file, chunk by chunk (next one prefetched), up to where its data ends."""
        for index in range(len(refs)):
            data = self.read(refs, size, index * CHUNK_SIZE, CHUNK_SIZE, path)
            if data:
                yield data
            if len(data) < CHUNK_SIZE:
                return

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.router.close()


def _assemble(
    refs: list[BlockRef],
    size: int,
    offset: int,
    length: int,
    load: Callable[[bytes], bytes | None],
) -> bytes | None:
    """The bytes of [offset, offset+length) from the chunks ``load`` returns (None if it cannot)."""
    end = min(size, offset + length)
    if offset >= end:
        return b""
    parts = []
    index = offset // CHUNK_SIZE
    while index * CHUNK_SIZE < end and index < len(refs):
        data = load(refs[index].id)
        if data is None:
            return None
        base = index * CHUNK_SIZE
        parts.append(data[max(offset - base, 0) : end - base])
        if len(data) < CHUNK_SIZE:
            break  # a short chunk is where the file's data ends
        index += 1
    return parts[0] if len(parts) == 1 else b"".join(parts)
