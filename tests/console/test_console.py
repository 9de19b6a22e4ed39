"""Every Zmachine's serial console through the API server (markers e2e, qemu, fuse).

One module-scoped environment (conftest.py): a busybox shell booted under QEMU/TCG, reached
only through kube-apiserver's aggregation layer and the console server. The tests share the
machine, since a boot takes ~15 s, and run in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pexpect
import pytest

from controller.api import subresources
from controller.console.plugin import Kube
from hack.consoleapi import APISERVICE
from tests.console.conftest import ARTIFACTS, NAME, ConsoleEnv
from tests.operator.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.qemu, pytest.mark.fuse, pytest.mark.timeout(900)]

FORBIDDEN = "Error from server (Forbidden): "
UNAUTHORIZED = "error: You must be logged in to the server (Unauthorized)"


def test_status_holds_the_console_path(console_env: ConsoleEnv) -> None:
    assert console_env.status()["consoleURL"] == (
        f"/apis/subresources.zos.threefold.io/v1/namespaces/{console_env.ns}/zmachines/{NAME}/console"
    )


def test_discovery_lists_the_subresources(console_env: ConsoleEnv) -> None:
    out = console_env.cluster.kubectl("get", "--raw", f"/apis/{subresources.GROUP}/v1").stdout
    names = {r["name"]: r["verbs"] for r in json.loads(out)["resources"]}
    assert names == {
        "zmachines/console": ["get"],
        "zmachines/log": ["get"],
        "zmachines/restart": ["update"],
    }
    got = console_env.cluster.get("apiservice", APISERVICE) or {}
    available = [c for c in got["status"]["conditions"] if c["type"] == "Available"]
    assert available[0]["status"] == "True"


def test_plugin_console_reads_types_and_leaves(console_env: ConsoleEnv) -> None:
    """In a pseudo-terminal: the boot output (history) first, a command typed into the
    busybox shell, its result, and the escape sequence ends the session with status 0."""
    child = pexpect.spawn(
        console_env.kubectl_path,
        ["zmachine", "-n", console_env.ns, "console", NAME],
        env=console_env.env("alice"),
        timeout=60,
        dimensions=(40, 120),
    )
    try:
        child.expect_exact("the escape sequence is ^]")
        child.expect_exact("Linux version")  # the kernel's first line: the history
        child.send("echo zm-$((6*7))\r")
        child.expect_exact("zm-42")  # computed by the guest's shell, not an echo of input
        child.send("\x1d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


async def _typist(kube: Kube, line: str, until: str, seen: list[str]) -> None:
    """Open a console session, type ``line`` until ``until`` appears, close it."""
    path = subresources.path(kube.namespace, NAME, subresources.CONSOLE)
    async with aiohttp.ClientSession() as session:
        ws = await kube.websocket(session, path)
        await _session_until(ws, until, line, seen)
        await ws.close()


def _kube(env: ConsoleEnv, user: str) -> Kube:
    return Kube.load(str(env.kubeconfigs[user]), None, env.ns)


def test_logs_follow_sees_new_output_and_tail_limits(console_env: ConsoleEnv) -> None:
    tail = console_env.plugin("carol", "logs", NAME, "--tail", "3")  # carol: viewer role
    assert tail.returncode == 0, tail.stderr
    assert 1 <= len(tail.stdout.splitlines()) <= 3
    follow = subprocess.Popen(
        [console_env.kubectl_path, "zmachine", "-n", console_env.ns, "logs", NAME, "-f",
         "--tail", "0"],
        env=console_env.env("carol"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert follow.stdout is not None
    out = follow.stdout.fileno()
    os.set_blocking(out, False)

    async def type_until_followed() -> bytes:
        """Type a line every few seconds until `logs -f` prints its result: the follow
        may start (a slow plugin start) after the first line was typed."""
        kube = _kube(console_env, "alice")
        path = subresources.path(kube.namespace, NAME, subresources.CONSOLE)
        got = b""
        deadline = time.monotonic() + 180
        async with aiohttp.ClientSession() as session:
            ws = await kube.websocket(session, path)
            while b"follow-42" not in got:
                assert time.monotonic() < deadline, got[-2000:]
                assert follow.poll() is None, follow.stderr.read() if follow.stderr else ""
                await ws.send_bytes(b"echo follow-$((40+2))\r")
                for _ in range(20):
                    with contextlib.suppress(BlockingIOError):
                        got += os.read(out, 65536)
                    await asyncio.sleep(0.25)
            await ws.close()
        return got

    try:
        assert b"follow-42" in asyncio.run(type_until_followed())
    finally:
        follow.terminate()
        follow.wait(10)


def test_who_may_use_the_console(console_env: ConsoleEnv) -> None:
    """RBAC through the API server: the console role in ns only; the viewer reads the log
    but may not type; no or an expired token is 401."""
    env = console_env
    ok = env.plugin("dave", "logs", NAME, "--tail", "1")  # a valid token of a bound SA
    assert ok.returncode == 0, ok.stderr
    for user in ("bob", "carol"):
        got = env.plugin(user, "console", NAME)
        assert got.returncode == 1
        assert got.stderr.startswith(FORBIDDEN), got.stderr
        assert f'User "{user}" cannot get resource "zmachines/console"' in got.stderr
    bob_log = env.plugin("bob", "logs", NAME)
    assert bob_log.returncode == 1 and bob_log.stderr.startswith(FORBIDDEN), bob_log.stderr
    elsewhere = subprocess.run(
        [env.kubectl_path, "zmachine", "-n", env.other_ns, "console", NAME],
        env=env.env("alice"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert elsewhere.returncode == 1
    assert elsewhere.stderr.startswith(FORBIDDEN), elsewhere.stderr
    assert f'in the namespace "{env.other_ns}"' in elsewhere.stderr
    for who in ("anonymous", "dave-expired"):
        got = env.plugin(who, "console", NAME)
        assert got.returncode == 1
        assert got.stderr.strip() == UNAUTHORIZED, (who, got.stderr)
    restart = env.plugin("carol", "restart", NAME)
    assert restart.returncode == 1 and restart.stderr.startswith(FORBIDDEN), restart.stderr


def _direct(env: ConsoleEnv, path: str, cert: tuple[Path, Path] | None, user: str) -> int:
    """A request straight to the console server, past the API server."""
    ctx = ssl.create_default_context(cafile=str(env.server.workdir / "console-pki" / "ca.crt"))
    ctx.check_hostname = False  # its certificate names the Service, not 127.0.0.1
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    request = urllib.request.Request(
        f"https://127.0.0.1:{env.server.port}{path}",
        headers={"X-Remote-User": user, "X-Remote-Group": "system:authenticated"},
    )
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_console_server_checks_the_proxy_and_the_user_itself(console_env: ConsoleEnv) -> None:
    """Reached directly (not through kube-apiserver): only the front proxy's certificate
    is believed, and the user it names still needs the RBAC grant (SubjectAccessReview)."""
    env = console_env
    pki = env.cluster.pki
    proxy = (pki / "front-proxy-client.crt", pki / "front-proxy-client.key")
    log_path = subresources.path(env.ns, NAME, subresources.LOG) + "?tailLines=1"
    assert _direct(env, log_path, proxy, "alice") == 200
    assert _direct(env, log_path, proxy, "bob") == 403
    assert _direct(env, log_path, None, "alice") == 401
    # A user's certificate from the cluster CA is not the front proxy's: it may not name users.
    alice_cert = (pki / "alice.crt", pki / "alice.key")
    try:
        code = _direct(env, log_path, alice_cert, "alice")
    except OSError:  # URLError, or the connection dropped right after the TLS 1.3 handshake
        code = 401  # refused by TLS: the certificate is not from the request-header CA
    assert code == 401


def test_console_survives_an_agent_restart_and_a_guest_reboot(console_env: ConsoleEnv) -> None:
    """One websocket session, held open: the agent is killed and started again, then the VM
    restarted through the plugin; the session carries on by itself after both."""
    env = console_env

    async def scenario() -> list[str]:
        kube = _kube(env, "alice")
        seen: list[str] = []
        await _typist(kube, "echo before-$((1+1))", "before-2", seen)
        path = subresources.path(kube.namespace, NAME, subresources.CONSOLE)
        async with aiohttp.ClientSession() as session:
            ws = await kube.websocket(session, path)
            env.agent.kill()
            await asyncio.sleep(2)
            await asyncio.to_thread(env.agent.start)
            text = await _session_until(ws, "after-agent-4", "echo after-agent-$((2+2))", seen)
            restarted = await asyncio.to_thread(env.plugin, "alice", "restart", NAME)
            assert restarted.returncode == 0, restarted.stderr
            assert "restarted" in restarted.stdout
            text = await _session_until(ws, "Linux version", "", seen, text)
            await _session_until(ws, "after-reboot-6", "echo after-reboot-$((3+3))", seen, text)
            await ws.close()
        return seen

    seen = asyncio.run(scenario())
    assert "Unavailable" in seen  # the banner while the agent was down


async def _session_until(
    ws: aiohttp.ClientWebSocketResponse, until: str, line: str, seen: list[str], text: str = ""
) -> str:
    """Read the session until ``until`` appears in what comes after ``text``; type ``line``
    (if any) every few seconds meanwhile, as a user would after a reconnection (keys typed
    while the agent is away are dropped). Status messages go to ``seen``."""
    start = len(text)
    deadline = time.monotonic() + 180
    last_typed = 0.0
    while until not in text[start:]:
        assert time.monotonic() < deadline, f"{until!r} never came; states {seen}: {text[-2000:]}"
        if line and time.monotonic() - last_typed > 4:
            await ws.send_bytes(line.encode() + b"\r")
            last_typed = time.monotonic()
        try:
            msg = await ws.receive(timeout=1)
        except TimeoutError:
            continue
        if msg.type == aiohttp.WSMsgType.BINARY:
            text += msg.data.decode(errors="replace")
        elif msg.type == aiohttp.WSMsgType.TEXT:
            seen.append(json.loads(msg.data)["state"])
        else:
            raise AssertionError(f"websocket ended: {msg}")
    return text


def test_pause_and_resume_through_the_plugin(console_env: ConsoleEnv) -> None:
    env = console_env
    # Pausing edits the spec: the user's own RBAC on zmachines, here the admin's.
    env.kubeconfigs["admin"] = env.cluster.kubeconfig
    paused = env.plugin("admin", "pause", NAME)
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == f"zmachine.zos.threefold.io/{NAME} paused"
    wait_for(lambda: env.status().get("phase") == "Paused", timeout=60, what="Paused")
    resumed = env.plugin("admin", "resume", NAME)
    assert resumed.returncode == 0, resumed.stderr
    wait_for(lambda: env.status().get("phase") == "Running", timeout=60, what="Running")
    denied = env.plugin("alice", "pause", NAME)
    assert denied.returncode == 1 and denied.stderr.startswith(FORBIDDEN), denied.stderr


_TERMINAL_TEXT = """() => {
  const t = window.zmachineTerminal;
  if (!t) return "";
  const b = t.buffer.active;
  const lines = [];
  for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
  return lines.join("\\n");
}"""


def test_browser_page_shows_boot_output_and_runs_a_command(console_env: ConsoleEnv) -> None:
    """Debian's chromium, headless, driven by Playwright: `kubectl zmachine open`'s page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    env = console_env
    server = subprocess.Popen(
        [env.kubectl_path, "zmachine", "-n", env.ns, "open", NAME],
        env=env.env("alice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/\S+", first)
        assert match, (first, server.stderr.read() if server.stderr and server.poll() else "")
        url = match.group(0)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "console-page.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 700})
                page.goto(url)
                page.wait_for_function(
                    f"() => ({_TERMINAL_TEXT})().includes('Linux version')", timeout=60_000
                )
                page.click("#terminal")
                page.keyboard.type("echo web-$((20+22))")
                page.keyboard.press("Enter")
                page.wait_for_function(
                    f"() => ({_TERMINAL_TEXT})().includes('web-42')", timeout=60_000
                )
                assert not page.is_visible("#banner")  # Running: no banner
                page.screenshot(path=str(shot))
                # A paused VM: a banner says so, and goes once it runs again.
                env.kubeconfigs["admin"] = env.cluster.kubeconfig
                assert env.plugin("admin", "pause", NAME).returncode == 0
                page.wait_for_selector("#banner.shown", timeout=60_000)
                assert "Paused" in page.inner_text("#banner")
                page.screenshot(path=str(ARTIFACTS / "console-page-paused.png"))
                assert env.plugin("admin", "resume", NAME).returncode == 0
                page.wait_for_selector("#banner", state="hidden", timeout=60_000)
                # The console server restarts: the page reconnects by itself (its first
                # attempts may meet a 503 while the APIService is unavailable; keys typed
                # then are lost, so type again as a user would).
                connects = page.evaluate("() => window.zmachineConnects")
                env.server.restart()
                deadline = time.monotonic() + 120
                while True:
                    assert time.monotonic() < deadline, page.evaluate(_TERMINAL_TEXT)[-2000:]
                    page.keyboard.type("echo again-$((50+5))")
                    page.keyboard.press("Enter")
                    with contextlib.suppress(PlaywrightTimeout):
                        page.wait_for_function(
                            f"() => ({_TERMINAL_TEXT})().includes('again-55')", timeout=8_000
                        )
                        break
                assert page.evaluate("() => window.zmachineConnects") > connects
                # A page from another origin cannot use the user's credentials.
                other = page.evaluate(
                    """url => new Promise(ok => {
                        const ws = new WebSocket(url);
                        ws.onopen = () => ok("open"); ws.onerror = () => ok("refused");
                    })""",
                    url.replace("http://127.0.0.1", "ws://localhost").split("?")[0] + "ws",
                )
                assert other == "refused"
            finally:
                browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(10)
