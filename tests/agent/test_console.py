"""The agent-owned serial console: rotation, history, subscribers, and following a real
PTY that is replaced (as cloud-hypervisor replaces it at every guest reboot)."""

from __future__ import annotations

import asyncio
import os
import tty
from pathlib import Path

import pytest
import structlog

from controller.agent.runtime.console import HISTORY_BYTES, SUBSCRIBER_BACKLOG, ConsoleStream

pytestmark = pytest.mark.timeout(60)


def test_rotation_caps_the_size_and_keeps_n_files(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    stream = ConsoleStream(log, max_bytes=100, keep=2)
    chunks = [bytes([ord("a") + i]) * 60 for i in range(5)]  # a*60, b*60, ... e*60
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    # Each 60-byte chunk would overflow the 100-byte file that holds one: a new file.
    assert log.read_bytes() == chunks[4]
    assert (tmp_path / "console.log.1").read_bytes() == chunks[3]
    assert (tmp_path / "console.log.2").read_bytes() == chunks[2]
    assert not (tmp_path / "console.log.3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "console.log",
        "console.log.1",
        "console.log.2",
    ]


def test_a_new_stream_appends_to_the_existing_log(tmp_path: Path) -> None:
    """An agent restart (or a VMM restart) must not wipe earlier output."""
    log = tmp_path / "console.log"
    log.write_bytes(b"before the restart\n")
    stream = ConsoleStream(log, max_bytes=1 << 20, keep=1)
    stream.feed(b"after\n")
    stream.close()
    assert log.read_bytes() == b"before the restart\nafter\n"


def test_history_ring_and_subscribers(tmp_path: Path) -> None:
    async def scenario() -> None:
        stream = ConsoleStream(tmp_path / "console.log", max_bytes=1 << 30, keep=1)
        with stream.subscribe() as early:
            assert early.empty()  # nothing seen yet: no history chunk
            stream.feed(b"one ")
            stream.feed(b"two ")
            assert [early.get_nowait(), early.get_nowait()] == [b"one ", b"two "]
        stream.feed(b"three")
        with stream.subscribe() as late:
            assert late.get_nowait() == b"one two three"  # the history first
            stream.feed(b"!")
            assert late.get_nowait() == b"!"
        stream.feed(b"?")  # no subscriber left: nothing queued anywhere
        assert late.empty()

        big = b"x" * 1000
        for _ in range(3 * HISTORY_BYTES // len(big)):
            stream.feed(big)
        history = stream.history()
        assert HISTORY_BYTES <= len(history) < HISTORY_BYTES + len(big)
        assert history.endswith(big)

        with stream.subscribe() as slow:
            slow.get_nowait()  # the history
            for i in range(SUBSCRIBER_BACKLOG + 5):
                stream.feed(b"%d," % i)
            assert slow.qsize() == SUBSCRIBER_BACKLOG
            assert slow.get_nowait() == b"5,"  # the five oldest were dropped, not the newest
        stream.close()

    asyncio.run(scenario())


class PtyVMM:
    """Stands in for a VMM's serial side with real PTYs (the test writes the master);
    ``replace`` makes a new PTY as cloud-hypervisor does at a guest reboot."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("test")
        self.running = True
        self.master, self.path = self._open()

    @staticmethod
    def _open() -> tuple[int, str]:
        master, peer = os.openpty()
        tty.setraw(peer)
        path = os.ttyname(peer)
        os.close(peer)
        return master, path

    def alive(self) -> bool:
        return self.running

    async def console_pty(self) -> str | None:
        return self.path

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def replace(self) -> None:
        os.close(self.master)
        self.master, self.path = self._open()

    def exit(self) -> None:
        self.running = False
        os.close(self.master)


def content(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


async def wait_for_content(path: Path, expected: bytes, within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while content(path) != expected:
        assert asyncio.get_running_loop().time() < deadline, content(path)
        await asyncio.sleep(0.05)


def test_follow_reads_the_pty_and_reopens_a_new_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = tmp_path / "console.log"
        stream = ConsoleStream(log, max_bytes=1 << 20, keep=1)
        vmm = PtyVMM()
        follower = asyncio.create_task(stream.follow(vmm))
        await asyncio.sleep(0)
        assert log.exists()  # from the start on, before any output
        try:
            with stream.subscribe() as live:
                vmm.write(b"first boot\n")
                await wait_for_content(log, b"first boot\n")
                first_path = vmm.path
                vmm.replace()  # guest reboot: the old PTY closes, a new one appears
                assert vmm.path != first_path
                vmm.write(b"second boot\n")
                await wait_for_content(log, b"first boot\nsecond boot\n")
                got = b""
                while not got.endswith(b"second boot\n"):
                    got += await asyncio.wait_for(live.get(), 5)
                assert got == b"first boot\nsecond boot\n"
            vmm.exit()
            await asyncio.wait_for(follower, 5)  # ends with the VMM
        finally:
            follower.cancel()
        assert stream.history() == b"first boot\nsecond boot\n"

    asyncio.run(scenario())


def test_input_reaches_the_current_pty_and_nothing_while_none_is_open(tmp_path: Path) -> None:
    """Keystrokes go to the PTY being read; across a replacement to the new one; while no
    PTY is open (the VM is down) nothing is taken, so nothing is typed late."""

    async def read_master(fd: int, expected: bytes) -> bytes:
        got = b""
        deadline = asyncio.get_running_loop().time() + 5
        while not got.endswith(expected):
            assert asyncio.get_running_loop().time() < deadline, got
            try:
                got += os.read(fd, 1024)
            except BlockingIOError:
                await asyncio.sleep(0.02)
        return got

    async def scenario() -> None:
        stream = ConsoleStream(tmp_path / "console.log", max_bytes=1 << 20, keep=1)
        assert stream.write(b"too early") == 0
        vmm = PtyVMM()
        follower = asyncio.create_task(stream.follow(vmm))
        try:
            deadline = asyncio.get_running_loop().time() + 5
            while stream.write(b"ls\r") == 0:  # 0 until the PTY is open
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            os.set_blocking(vmm.master, False)
            stream.resize(40, 120)
            assert await read_master(vmm.master, b"ls\r") == b"ls\r"
            vmm.replace()
            os.set_blocking(vmm.master, False)
            deadline = asyncio.get_running_loop().time() + 5
            while stream.write(b"after\r") == 0:  # the old PTY is gone; wait for the new
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            assert (await read_master(vmm.master, b"after\r")).endswith(b"after\r")
            vmm.exit()
            await asyncio.wait_for(follower, 5)
            assert not stream.connected
            assert stream.write(b"late") == 0
        finally:
            follower.cancel()
            stream.close()

    asyncio.run(scenario())
