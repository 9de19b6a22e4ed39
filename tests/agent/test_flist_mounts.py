"""The node's shared flist mounts (controller/agent/guest/flistmounts.py), with real FUSE:
one server per distinct flist, ended by its last user, and after an agent restart reused
when a record names it and swept when none does."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from controller.agent.guest.flistmounts import FlistMounts
from controller.agent.runtime.procs import ProcessRef, terminate
from controller.flist import fetch, mount
from tests.faults.invariants import leaks

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


Node = tuple[Path, Path, str]  # state dir, fetched flist, its mount's key


@pytest.fixture
def node(tmp_path: Path, agent_busybox_flist: Path) -> Node:
    state = tmp_path / "state"
    flist = fetch.fetch_flist(f"file://{agent_busybox_flist}", state / "cache")
    return state, flist, FlistMounts.key(flist)


def _server_alive(mounts: FlistMounts, key: str) -> ProcessRef | None:
    server = mounts._server(key)
    return server if server is not None and server.alive() else None


def test_one_mount_per_flist_ended_by_its_last_user(node: Node) -> None:
    state, flist, key = node

    async def scenario() -> None:
        mounts = FlistMounts(state, state / "cache")
        a, b = await asyncio.gather(mounts.acquire("vm-a", flist), mounts.acquire("vm-b", flist))
        assert a == b and mount.is_mounted(a) and (a / "bin" / "busybox").exists()
        server = _server_alive(mounts, key)
        assert server is not None
        await mounts.release("vm-a", key)
        assert mount.is_mounted(a) and server.alive(), "vm-b still uses it"
        await mounts.release("vm-b", key)
        assert not mount.is_mounted(a) and not server.alive()

    asyncio.run(scenario())
    assert leaks([state]) == []


def test_after_a_restart_a_named_mount_is_reused_and_an_unnamed_one_swept(node: Node) -> None:
    state, flist, key = node

    async def scenario() -> None:
        point = await FlistMounts(state, state / "cache").acquire("vm-a", flist)
        # The agent dies here. Its successor finds vm-a's record naming the mount.
        again = FlistMounts(state, state / "cache")
        again.adopt("vm-a", key)
        await again.sweep()
        server = _server_alive(again, key)
        assert mount.is_mounted(point) and server is not None
        assert await again.acquire("vm-b", flist) == point
        assert _server_alive(again, key) == server, "the running server is reused"
        # It dies again; no record names the mount any more (both VMs were deleted, or
        # the agent died between mounting and saving the record): the sweep ends it.
        last = FlistMounts(state, state / "cache")
        await last.sweep()
        assert not mount.is_mounted(point) and not server.alive()

    asyncio.run(scenario())
    assert leaks([state]) == []


def test_a_dead_server_is_replaced(node: Node) -> None:
    """A server that died leaves a mount answering ENOTCONN: the next user gets a new one."""
    state, flist, key = node

    async def scenario() -> None:
        mounts = FlistMounts(state, state / "cache")
        point = await mounts.acquire("vm-a", flist)
        first = _server_alive(mounts, key)
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        await terminate(first)  # only waits: it is dead already
        assert await mounts.acquire("vm-b", flist) == point
        second = _server_alive(mounts, key)
        assert second is not None and second.pid != first.pid
        assert (point / "bin" / "busybox").exists()
        await mounts.release("vm-a", key)
        await mounts.release("vm-b", key)

    asyncio.run(scenario())
    assert leaks([state]) == []
