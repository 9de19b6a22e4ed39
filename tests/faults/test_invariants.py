"""The checkers themselves: each must see the fault it exists to catch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.invariants import OneVmmPerUid, leaks, vmm_pids_by_uid

UID = "0b7e3c1a-5d2f-4a8e-9c61-2f4d8e7a1b90"


def _pretend_vmm(state: Path) -> subprocess.Popen[bytes]:
    """A sleeping process whose command line looks like a VMM of `UID` under `state`."""
    sock = state / "vms" / UID / "run" / "api.sock"
    code = "import time; time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code, "--api-socket", f"path={sock}"])


@pytest.mark.faults
def test_two_vmms_for_one_uid_are_a_violation(tmp_path: Path) -> None:
    agents = [tmp_path / "a", tmp_path / "b"]
    first = _pretend_vmm(agents[0])
    try:
        checker = OneVmmPerUid(agents, interval=0.05)
        with pytest.raises(AssertionError, match="more than one VMM"), checker.watching():
            second = _pretend_vmm(agents[1])
            try:
                while not checker.violations:
                    time.sleep(0.05)
            finally:
                second.kill()
                second.wait()
        assert vmm_pids_by_uid(agents) == {UID: [first.pid]}
    finally:
        first.kill()
        first.wait()


@pytest.mark.faults
def test_leaks_names_processes_and_records(tmp_path: Path) -> None:
    assert leaks([tmp_path]) == []
    (tmp_path / "machines").mkdir()
    (tmp_path / "machines" / f"{UID}.json").write_text("{}")
    vmm = _pretend_vmm(tmp_path)
    try:
        # One CI run's single scan missed the fresh process (cause not found); the fault
        # tests poll too, and a checker that never sees it still fails at the deadline.
        deadline = time.monotonic() + 10
        found = leaks([tmp_path])
        while not any(f.startswith(f"process {vmm.pid}") for f in found):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            found = leaks([tmp_path])
    finally:
        vmm.kill()
        vmm.wait()
    assert any(f.startswith(f"process {vmm.pid}") for f in found), found
    assert any(f.startswith("record ") for f in found), found
