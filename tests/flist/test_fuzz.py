"""Fuzzing the readers with hypothesis: whatever the bytes, the only outcome besides success is a
typed error (never another exception, a hang or unbounded work).

Seed corpus (tests/flist/corpus, committed): ``tiny.fl`` = ``pack`` of a 8-entry tree (boot
kernel + symlink, /etc, an absolute dir link, a fifo), vacuumed to 512-byte pages; ``tiny.flist``
= the same tree built with tests/flist/v1_builder.py."""

from __future__ import annotations

import contextlib
import gzip
import io
import sqlite3
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.flist.bootmode import detect
from controller.flist.capnp import CapnpError, Message, Struct
from controller.flist.chunks import BlockRef, decode
from controller.flist.errors import BlockCorruptError, FlistError
from controller.flist.meta import open_flist

CORPUS = Path(__file__).parent / "corpus"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.timeout(300)

mutations = st.lists(
    st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8
)


def mutate(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    buffer = bytearray(data)
    for position, value in changes:
        buffer[position % len(buffer)] = value
    return bytes(buffer)


def read_all(path: Path) -> None:
    """Everything a user of the flist might touch, metadata-wise."""
    with open_flist(path) as flist:
        for item, entry in flist.walk():
            flist.resolve(item, follow=False)
            if entry.is_file:
                flist.blocks(entry)
        flist.store_specs()
        detect(flist, Path("/"))


def expect_flist_error(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        with contextlib.suppress(FlistError):
            read_all(path)


@FUZZ
@given(mutations)
def test_fl_database_mutations(changes: list[tuple[int, int]]) -> None:
    expect_flist_error(mutate((CORPUS / "tiny.fl").read_bytes(), changes), ".fl")


@FUZZ
@given(st.integers(1, 7679))
def test_fl_database_truncations(cut: int) -> None:
    expect_flist_error((CORPUS / "tiny.fl").read_bytes()[:cut], ".fl")


@FUZZ
@given(mutations)
def test_flist_archive_mutations(changes: list[tuple[int, int]]) -> None:
    expect_flist_error(mutate((CORPUS / "tiny.flist").read_bytes(), changes), ".flist")


def _v1_entries() -> list[tuple[str, bytes]]:
    with tarfile.open(CORPUS / "tiny.flist") as tar:
        handle = tar.extractfile("./flistdb.sqlite3")
        assert handle is not None
        conn = sqlite3.connect(":memory:")
        conn.deserialize(handle.read())
    return [(str(k), bytes(v)) for k, v in conn.execute("SELECT key, value FROM entries")]


V1_ENTRIES = _v1_entries()


def _archive(entries: list[tuple[str, bytes]]) -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE entries (key VARCHAR(64) PRIMARY KEY, value BLOB)")
    conn.executemany("INSERT INTO entries VALUES (?, ?)", entries)
    db = conn.serialize()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("flistdb.sqlite3")
        info.size = len(db)
        tar.addfile(info, io.BytesIO(db))
    return gzip.compress(out.getvalue())


@FUZZ
@given(st.integers(0, len(V1_ENTRIES) - 1), mutations)
def test_v1_capnp_object_mutations(index: int, changes: list[tuple[int, int]]) -> None:
    """Mutations inside the capnp objects (which a whole-archive mutation rarely reaches)."""
    entries = list(V1_ENTRIES)
    key, value = entries[index]
    entries[index] = (key, mutate(value, changes))
    expect_flist_error(_archive(entries), ".flist")


def _deep_read(node: Struct, depth: int = 0) -> None:
    for i in range(4):
        node.uint16(i), node.uint32(i), node.uint64(i)
    if depth > 3:
        return
    for i in range(node.ptr_count):
        for reader in (node.text, node.data, node.struct, node.struct_list):
            try:
                result = reader(i)
            except CapnpError:
                continue
            children = result if isinstance(result, list) else [result]
            for child in children:
                if isinstance(child, Struct):
                    _deep_read(child, depth + 1)


@FUZZ
@given(st.binary(max_size=512))
def test_capnp_reader_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(CapnpError):
        _deep_read(Message(data).root())


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([16, 32]), st.binary(min_size=32, max_size=32))
def test_block_decoder_on_random_bytes(data: bytes, key_size: int, key: bytes) -> None:
    with pytest.raises(BlockCorruptError):
        decode(data, BlockRef(b"\0" * key_size, key[:key_size]))
