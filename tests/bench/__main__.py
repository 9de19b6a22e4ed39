"""`make bench`: every benchmark, each writing its section of docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    ["tests.bench.flist_bench", "--write"],
    ["tests.bench.guest_boot", "--runs", "3", "--write"],
    ["tests.bench.agent_lifecycle", "--runs", "3", "--write"],
    ["tests.bench.controller_bench", "--objects", "100", "--write"],
)


def main() -> int:
    failed = []
    for module, *args in BENCHMARKS:
        print(f"[bench] {module} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *args]).returncode != 0:
            failed.append(module)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
