"""The committed gRPC code must be what hack/gen-proto.sh produces from the .proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path("controller/agent/rpc/proto")


def _generated(base: Path) -> dict[Path, Path]:
    return {p.relative_to(base): p for p in (base / PROTO_DIR).rglob("*_pb2*.py*")}


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "hack/gen-proto.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    fresh, committed = _generated(tmp_path), _generated(ROOT)
    assert fresh, "gen-proto.sh produced no files"
    assert sorted(fresh) == sorted(committed), "generated file set differs: run hack/gen-proto.sh"
    stale = [
        str(rel) for rel, path in fresh.items() if not filecmp.cmp(path, committed[rel], False)
    ]
    assert not stale, f"stale generated code {stale}: run hack/gen-proto.sh and commit"


def test_enums_reserve_unspecified_zero() -> None:
    from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.name} value 0 is {zero}"
