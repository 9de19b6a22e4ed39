"""kubectl-zmachine: a Zmachine's serial console in a terminal or a browser, its serial log,
pause/resume/restart. A kubectl plugin (``kubectl zmachine ...``) that uses the user's
kubeconfig and context as kubectl does; every request goes through the API server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import sys
import termios
import tty
import webbrowser
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from kubernetes import client, config

from controller.api import subresources
from controller.api.zmachine import GROUP, PLURAL, VERSION

ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console
ESCAPE_NAME = "^]"
STATIC = Path(__file__).resolve().parent / "static"


class PluginError(Exception):
    """Printed as is (kubectl style) and exit code 1; ``code`` is the HTTP status, if any."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def status_error(code: int, body: str) -> PluginError:
    """The error kubectl would print for this response."""
    try:
        status = json.loads(body)
    except ValueError:
        status = {}
    if code == 401:
        return PluginError("error: You must be logged in to the server (Unauthorized)", code)
    message = status.get("message") or body.strip() or f"HTTP {code}"
    reason = status.get("reason") or ""
    return PluginError(
        f"Error from server ({reason}): {message}" if reason else f"Error from server: {message}",
        code,
    )


@dataclass
class Kube:
    """The API server as the user's kubeconfig reaches it."""

    server: str
    ssl: ssl.SSLContext | bool
    headers: dict[str, str]
    namespace: str

    @classmethod
    def load(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> Kube:
        cfg = client.Configuration()
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=cfg
            )
            contexts, active = config.list_kube_config_contexts(kubeconfig)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as exc:
            raise PluginError(f"error: {exc}") from exc
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        ns = namespace or (active.get("context") or {}).get("namespace") or "default"
        if cfg.refresh_api_key_hook is not None:  # exec / auth-provider credentials
            cfg.refresh_api_key_hook(cfg)
        # Bearer tokens (static, exec, OIDC) as the generated client would send them.
        settings: dict[str, Any] = dict(cfg.auth_settings())
        headers = {
            str(auth["key"]): str(auth["value"])
            for auth in settings.values()
            if auth.get("in") == "header" and auth.get("value")
        }
        tls: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            tls = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        elif cfg.cert_file:
            tls = ssl.create_default_context()
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
            tls.load_cert_chain(cfg.cert_file, cfg.key_file)
        return cls(cfg.host.rstrip("/"), tls, headers, ns)

    def url(self, path: str) -> str:
        return self.server + path

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = {**self.headers, "Content-Type": content_type}
        async with session.request(
            method, self.url(path), data=data, headers=headers, ssl=self.ssl
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise status_error(resp.status, text)
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    @contextlib.asynccontextmanager
    async def stream(
        self, session: aiohttp.ClientSession, path: str, params: dict[str, str]
    ) -> AsyncIterator[aiohttp.StreamReader]:
        async with session.get(
            self.url(path), params=params, headers=self.headers, ssl=self.ssl,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as resp:  # fmt: skip
            if resp.status >= 400:
                raise status_error(resp.status, await resp.text())
            yield resp.content

    async def websocket(
        self, session: aiohttp.ClientSession, path: str
    ) -> aiohttp.ClientWebSocketResponse:
        try:
            return await session.ws_connect(
                self.url(path), headers=self.headers, ssl=self.ssl, heartbeat=30
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The handshake error has no body; the same GET without Upgrade gets the
            # API server's Status (401/403/404 are decided before the upgrade).
            async with session.get(self.url(path), headers=self.headers, ssl=self.ssl) as resp:
                body = await resp.text()
            raise status_error(exc.status, body if resp.status == exc.status else "") from exc
        except aiohttp.ClientError as exc:
            raise PluginError(f"error: cannot reach the API server {self.server}: {exc}") from exc


def _zmachine_path(kube: Kube, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{kube.namespace}/{PLURAL}/{name}"


# ------------------------------------------------------------------------------ console


class RawTerminal:
    """The user's terminal in raw mode (keys go to the guest as typed) while in use."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def size(self) -> tuple[int, int] | None:
        try:
            cols, rows = os.get_terminal_size(self.fd)
        except OSError:
            return None
        return cols, rows


def _banner(msg: dict[str, Any], who: str) -> str | None:
    if msg.get("type") != "status":
        return None
    if msg.get("state") == "Running":
        return f"\r\n[{who} is Running]\r\n"
    extra = f": {msg['message']}" if msg.get("message") else ""
    return f"\r\n[{who} is {msg.get('state')}{extra}; waiting]\r\n"


async def console(kube: Kube, name: str) -> int:
    who = f"zmachine {kube.namespace}/{name}"
    path = subresources.path(kube.namespace, name, subresources.CONSOLE)
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.buffer
    async with aiohttp.ClientSession() as session:
        ws = await kube.websocket(session, path)
        sys.stderr.write(f"Connected to {who}; the escape sequence is {ESCAPE_NAME}\n")
        sys.stderr.flush()
        done: asyncio.Future[int] = loop.create_future()
        with RawTerminal(stdin) as term:

            async def send_size() -> None:
                if (size := term.size()) is not None:
                    await ws.send_str(
                        json.dumps({"type": "resize", "cols": size[0], "rows": size[1]})
                    )

            typed: asyncio.Queue[bytes] = asyncio.Queue()

            def keys() -> None:
                data = os.read(stdin, 4096)
                if not data or ESCAPE in data:
                    typed.put_nowait(data.split(ESCAPE, 1)[0])
                    typed.put_nowait(b"")  # the end: leave once what came before is sent
                    loop.remove_reader(stdin)
                    return
                typed.put_nowait(data)

            async def input_() -> None:
                while data := await typed.get():
                    await ws.send_bytes(data)
                if not done.done():
                    done.set_result(0)

            async def output() -> None:
                async for msg in ws:
                    if msg.type == WSMsgType.BINARY:
                        stdout.write(msg.data)
                        stdout.flush()
                    elif msg.type == WSMsgType.TEXT and (
                        text := _banner(json.loads(msg.data), who)
                    ):
                        sys.stderr.write(text)
                        sys.stderr.flush()
                if not done.done():
                    done.set_result(1)

            loop.add_reader(stdin, keys)
            resized = asyncio.Event()
            loop.add_signal_handler(signal.SIGWINCH, resized.set)

            async def sizes() -> None:
                while True:
                    await resized.wait()
                    resized.clear()
                    await send_size()

            tasks = [asyncio.create_task(t()) for t in (output, input_, sizes)]
            try:
                await send_size()
                code = await done
            finally:
                loop.remove_reader(stdin)
                loop.remove_signal_handler(signal.SIGWINCH)
                for task in tasks:
                    task.cancel()
                await ws.close()
        sys.stderr.write("\n" + ("" if code == 0 else f"{who}: connection closed\n"))
        return code


async def logs(kube: Kube, name: str, follow: bool, tail: int) -> int:
    path = subresources.path(kube.namespace, name, subresources.LOG)
    params = {"follow": "true" if follow else "false", "tailLines": str(tail)}
    out = sys.stdout.buffer
    async with aiohttp.ClientSession() as session, kube.stream(session, path, params) as body:
        async for chunk in body.iter_any():
            out.write(chunk)
            out.flush()
    return 0


# ------------------------------------------------------------------------------ open


def page_app(kube: Kube, name: str, token: str, port: int) -> web.Application:
    """The page and a websocket that forwards to the API server with the user's
    credentials, under a random path: other local users and other web sites cannot
    use them (the Host and Origin are checked too: no DNS rebinding, no cross-site use)."""
    path = subresources.path(kube.namespace, name, subresources.CONSOLE)
    if not (STATIC / "vendor" / "xterm.js").exists():
        raise PluginError(
            "error: the console page's xterm.js is missing: run `make console-assets` "
            "(hack/build-console-assets.sh)"
        )

    def local_only(request: web.Request) -> None:
        here = f"127.0.0.1:{port}"
        if (
            request.host != here
            or request.headers.get("Origin", f"http://{here}") != f"http://{here}"
        ):
            raise web.HTTPForbidden(text="not from this page")

    async def proxy(request: web.Request) -> web.StreamResponse:
        local_only(request)
        browser = web.WebSocketResponse(heartbeat=30)
        await browser.prepare(request)
        async with aiohttp.ClientSession() as session:
            try:
                upstream = await kube.websocket(session, path)
            except PluginError as exc:
                await browser.send_json({"type": "error", "message": str(exc)})
                # A refusal (4401/4403/4404) is final for the page; anything else (the API
                # server or the console server unavailable) it retries.
                refused = exc.code in (401, 403, 404)
                await browser.close(code=4000 + exc.code if refused else 1011)
                return browser

            async def down() -> None:
                async for msg in upstream:
                    if msg.type == WSMsgType.BINARY:
                        await browser.send_bytes(msg.data)
                    elif msg.type == WSMsgType.TEXT:
                        await browser.send_str(msg.data)
                await browser.close()

            pump = asyncio.create_task(down())
            try:
                async for msg in browser:
                    if msg.type == WSMsgType.BINARY:
                        await upstream.send_bytes(msg.data)
                    elif msg.type == WSMsgType.TEXT:
                        await upstream.send_str(msg.data)
            finally:
                pump.cancel()
                await upstream.close()
        return browser

    async def index(request: web.Request) -> web.StreamResponse:
        local_only(request)
        return web.FileResponse(STATIC / "index.html")

    app = web.Application()
    app.add_routes(
        [
            web.get(f"/{token}/", index),
            web.get(f"/{token}/ws", proxy),
            web.static(f"/{token}/", STATIC),
        ]
    )
    return app


async def open_page(kube: Kube, name: str, port: int, browser: bool) -> int:
    token = secrets.token_urlsafe(18)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    runner = web.AppRunner(page_app(kube, name, token, port), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    url = f"http://127.0.0.1:{port}/{token}/?zmachine={kube.namespace}/{name}"
    print(f"Console of zmachine {kube.namespace}/{name}: {url}", flush=True)
    print("Serving until interrupted (Ctrl-C).", flush=True)
    if browser:
        webbrowser.open(url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0


# ------------------------------------------------------------------------------ power


async def power(kube: Kube, action: str, name: str) -> int:
    async with aiohttp.ClientSession() as session:
        if action == "restart":
            path = subresources.path(kube.namespace, name, subresources.RESTART)
            await kube.request(session, "PUT", path, {})
        else:
            await kube.request(
                session,
                "PATCH",
                _zmachine_path(kube, name),
                {"spec": {"paused": action == "pause"}},
                content_type="application/merge-patch+json",
            )
    print(f"zmachine.{GROUP}/{name} {action}{'d' if action.endswith('e') else 'ed'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl zmachine", description=__doc__)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--context", default=None)
    p.add_argument("-n", "--namespace", default=None)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("console", help=f"interactive serial console (leave with {ESCAPE_NAME})")
    c.add_argument("name")
    lg = sub.add_parser("logs", help="the serial log")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--tail", type=int, default=-1, help="last N lines (default: all)")
    o = sub.add_parser("open", help="the console in a browser, served on 127.0.0.1")
    o.add_argument("name")
    o.add_argument("--port", type=int, default=0, help="local port (default: any free one)")
    o.add_argument("--browser", action="store_true", help="also open the URL in a browser")
    for action in ("pause", "resume", "restart"):
        a = sub.add_parser(action, help=f"{action} the VM")
        a.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        kube = Kube.load(args.kubeconfig, args.context, args.namespace)
        if args.command == "console":
            return asyncio.run(console(kube, args.name))
        if args.command == "logs":
            return asyncio.run(logs(kube, args.name, args.follow, args.tail))
        if args.command == "open":
            return asyncio.run(open_page(kube, args.name, args.port, args.browser))
        return asyncio.run(power(kube, args.command, args.name))
    except PluginError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
