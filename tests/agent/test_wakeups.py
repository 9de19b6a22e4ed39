"""Wake-ups without polling (controller/agent/runtime/wakeups.py): a write to the file and
the exit of the process each wake the waiter, nothing else does, and nothing is left open
once the last watch ends."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from controller.agent.runtime import wakeups


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _append(path: Path) -> None:
    """What the VMM does: one event more at the end of its file."""
    with open(path, "a") as f:
        f.write("{}\n")


async def _woken(event: asyncio.Event, within: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        return False
    return True


def test_a_write_and_an_exit_wake_the_waiter_and_nothing_leaks(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text("")
    before = _fds()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        asyncio.run(_write_and_exit(path, proc))
    finally:
        proc.kill()
        proc.wait()
    assert _fds() == before, "an inotify or pidfd descriptor was left open"
    assert not wakeups._inotify


async def _write_and_exit(path: Path, proc: subprocess.Popen[bytes]) -> None:
    with wakeups.changes(path, proc.pid) as (changed, watched):
        assert watched
        assert not await _woken(changed, 0.3), "woken with nothing changed"
        _append(path)
        assert await _woken(changed, 5), "a write did not wake"
        changed.clear()
        # A second watch on the same file (the same inotify watch) wakes both.
        with wakeups.changes(path, proc.pid) as (other, _):
            _append(path)
            assert await _woken(changed, 5) and await _woken(other, 5)
        changed.clear()
        _append(path)  # the first watch still works after the second ended
        assert await _woken(changed, 5)
        changed.clear()
        proc.terminate()
        assert await _woken(changed, 5), "the process's exit did not wake"


def test_what_cannot_be_watched_says_so(tmp_path: Path) -> None:
    """A missing file: the caller is told to poll. A process gone already: woken at once."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    asyncio.run(_unwatchable(tmp_path, proc.pid))


async def _unwatchable(tmp_path: Path, gone: int) -> None:
    with wakeups.changes(tmp_path / "missing", os.getpid()) as (changed, watched):
        assert not watched
        assert not changed.is_set()
    with wakeups.changes(tmp_path, gone) as (changed, _):
        assert changed.is_set()
    assert not wakeups._inotify
