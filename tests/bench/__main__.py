"""`make bench`: every benchmark, each writing its section of docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench.report import write_section

BENCHMARKS = (
    ["tests.bench.flist_bench", "--write"],
    ["tests.bench.guest_boot", "--runs", "3", "--write"],
    ["tests.bench.agent_lifecycle", "--runs", "3", "--write"],
    ["tests.bench.controller_bench", "--objects", "100", "--write"],
    ["tests.bench.host_overhead", "--vms", "1", "10", "30", "--write"],
)
# Eight nodes for 5,000: a node's bridge takes at most 1,024 taps.
SCALE_RUNS = (("1000", "4"), ("5000", "8"))


def main() -> int:
    if sys.argv[1:2] == ["scale"]:  # `python -m tests.bench scale ...`: that one alone
        from tests.bench import scale

        scale.main(sys.argv[2:])
        return 0
    failed = []
    for module, *args in BENCHMARKS:
        print(f"[bench] {module} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *args]).returncode != 0:
            failed.append(module)
    runs = []
    for objects, nodes in SCALE_RUNS:
        print(f"[bench] scale --objects {objects} --nodes {nodes}", flush=True)
        out = Path(tempfile.mkdtemp()) / "scale.json"
        argv = ["scale", "--objects", objects, "--nodes", nodes, "--rate", "20", "--json", str(out)]
        if subprocess.run([sys.executable, "-m", "tests.bench", *argv]).returncode != 0:
            failed.append(f"scale {objects}")
        else:
            runs.append(json.loads(out.read_text()))
    if runs:
        from tests.bench import scale

        write_section("Scale", scale.section(runs))
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
