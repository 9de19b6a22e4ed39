"""Flist benchmark: pack throughput, cold/warm sequential reads through the FUSE mount, time to
first byte. Run as root: ``python -m tests.bench.flist_bench [--write]`` (``--write`` replaces the
"Flists" section of docs/benchmarks.md). Figures are medians of ``--runs`` runs."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from controller.flist import xxtea
from controller.flist.chunks import CHUNK_SIZE, decode, encode_v1
from controller.flist.mount import mount_command, unmount, wait_mounted
from controller.flist.pack import pack
from tests.bench.report import write_section

COMMAND = ".venv/bin/python -m tests.bench.flist_bench --write"
READ_SIZE = 1 << 20


def make_dataset(root: Path, large_mib: int, small_files: int) -> int:
    """A large file (half random, half repetitive text: snappy sees both) and many small files."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    half = large_mib << 19
    text = b"".join(f"line {i} of a log-like text file\n".encode() for i in range(40000))
    with (root / "large.bin").open("wb") as out:
        out.write(rng.randbytes(half))
        while out.tell() < 2 * half:
            out.write(text[: 2 * half - out.tell()])
    for i in range(small_files):
        directory = root / f"d{i % 50}"
        directory.mkdir(exist_ok=True)
        (directory / f"f{i}").write_bytes(rng.randbytes(rng.randrange(100, 20000)))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_all(path: Path) -> tuple[float, float]:
    """(seconds to the first byte, seconds for the whole file)."""
    start = time.perf_counter()
    with path.open("rb", buffering=0) as handle:
        handle.read(4096)
        first = time.perf_counter() - start
        while handle.read(READ_SIZE):
            pass
    return first, time.perf_counter() - start


def with_mount(flist: Path, cache: Path, work: Path, action: Callable[[Path], float]) -> float:
    mountpoint = Path(tempfile.mkdtemp(dir=work))
    process = subprocess.Popen(mount_command(flist, mountpoint, cache), stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mountpoint, timeout=30)
        return action(mountpoint)
    finally:
        unmount(mountpoint)
        process.wait(timeout=30)


def v1_decode_rate(runs: int) -> float:
    """MB/s of opening v1 chunks (XXTEA in pure Python dominates)."""
    plain = random.Random(3).randbytes(CHUNK_SIZE)
    ref, stored = encode_v1(plain)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        decode(stored, ref)
        rates.append(CHUNK_SIZE / 1e6 / (time.perf_counter() - start))
    return statistics.median(rates)


def run(work: Path, large_mib: int, small_files: int, runs: int) -> dict[str, float]:
    source = work / "src"
    total = make_dataset(source, large_mib, small_files)
    pack_rates, repack_rates = [], []
    for i in range(runs):
        store = work / f"store{i}"
        stats = pack(source, work / "bench.fl", [f"dir://{store}"])
        pack_rates.append(total / 1e6 / stats.seconds)
        again = pack(source, work / "bench.fl", [f"dir://{store}"])
        repack_rates.append(total / 1e6 / again.seconds)
        if i < runs - 1:
            shutil.rmtree(store)
    flist = work / "bench.fl"
    size = (source / "large.bin").stat().st_size
    cold, warm, first_bytes, ready = [], [], [], []
    for i in range(runs):
        cache = work / f"cache{i}"
        start = time.perf_counter()

        def measure_cold(root: Path, start: float = start) -> float:
            ready.append(time.perf_counter() - start)
            first, whole = read_all(root / "large.bin")
            first_bytes.append(first)
            return whole

        cold.append(size / 1e6 / with_mount(flist, cache, work, measure_cold))
        # A new mount has an empty page cache; the block cache is now full.
        warm.append(
            size
            / 1e6
            / with_mount(flist, cache, work, lambda root: read_all(root / "large.bin")[1])
        )
    return {
        "load": os.getloadavg()[0],
        "v1_decode": v1_decode_rate(runs),
        "total_mb": total / 1e6,
        "large_mb": size / 1e6,
        "pack": statistics.median(pack_rates),
        "repack": statistics.median(repack_rates),
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "ttfb_ms": statistics.median(first_bytes) * 1000,
        "ready_ms": statistics.median(ready) * 1000,
    }


def xxtea_impl() -> str:
    return "pure-Python" if xxtea._native is None else "C"


def section(figures: dict[str, float], args: argparse.Namespace) -> str:
    return f"""## Flists

Command (as root): `{COMMAND} --large-mib {args.large_mib} --small-files {args.small_files} \
--runs {args.runs}`. Medians of {args.runs} runs on the 2-core dev machine, shared with other
work (1-minute load average {figures["load"]:.1f} at the end, so expect noise: pack varied from
55 to 150 MB/s between runs on this shared machine); `dir://` store and block cache on the same
local disk.

Dataset: {figures["total_mb"]:.0f} MB — one {figures["large_mb"]:.0f} MB file (half random, half
repetitive text) plus {args.small_files} small files (100 B to 20 KB).

| what | figure |
|---|---|
| pack, new store (chunk, blake2b, snappy, AES-GCM, write) | {figures["pack"]:.1f} MB/s |
| pack again into the same store (blocks exist, none written) | {figures["repack"]:.1f} MB/s |
| cold sequential read through the mount (empty block cache) | {figures["cold"]:.1f} MB/s |
| warm sequential read (new mount, block cache full) | {figures["warm"]:.1f} MB/s |
| time to first byte, cold (open + first 4 KiB read) | {figures["ttfb_ms"]:.1f} ms |
| mount command start to mounted | {figures["ready_ms"]:.0f} ms |
| v1 `.flist` chunk decode, no mount ({xxtea_impl()} XXTEA) | {figures["v1_decode"]:.1f} MB/s |

Reads go 1 MiB at a time from Python; the kernel asks FUSE for 128 KiB pieces. Cold reads fetch,
decrypt, decompress and verify each 512 KiB chunk (the next chunk is prefetched in the
background), then write it to the cache; warm reads verify the cached chunk against its key.
Without the `xxtea` package v1 chunks decode at about 1 MB/s (pure Python); either way this is
paid once per chunk, the cache then holds plaintext.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts)")
    with tempfile.TemporaryDirectory(prefix="flist-bench-") as tmp:
        figures = run(Path(tmp), args.large_mib, args.small_files, args.runs)
    text = section(figures, args)
    print(text)
    if args.write:
        write_section("Flists", text)


if __name__ == "__main__":
    main()
