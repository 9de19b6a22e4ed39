"""fake_zdb: a minimal 0-db stand-in for CI (no 0-db binary is packaged for Debian;
test_zdb_real.py runs the store against a real 0-db built from source when ``zdb`` is on PATH).
It speaks RESP over TCP like 0-db in user mode: namespaces with an
optional password (public read, write needs it), SELECT ns [password], GET/SET/EXISTS/PING with
binary keys, SET answering the key. It also counts commands so tests can assert on traffic."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter
from typing import Any


class FakeZdb:
    def __init__(self, passwords: dict[str, str] | None = None) -> None:
        self.data: dict[str, dict[bytes, bytes]] = {"default": {}}
        self.passwords = passwords or {}
        self.commands: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.clients: list[socket.socket] = []
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner.clients.append(self.connection)
                state = {"ns": "default", "writable": True}
                while True:
                    try:
                        args = self._read_command()
                    except (ConnectionError, ValueError):
                        return
                    if args is None:
                        return
                    self.wfile.write(owner.execute(state, args))

            def _read_command(self) -> list[bytes] | None:
                line = self.rfile.readline()
                if not line:
                    return None
                if not line.startswith(b"*"):
                    raise ValueError("inline commands are not supported")
                args = []
                for _ in range(int(line[1:])):
                    size = int(self.rfile.readline()[1:])
                    args.append(self.rfile.read(size + 2)[:-2])
                return args

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def execute(self, state: dict[str, Any], args: list[bytes]) -> bytes:
        name = args[0].decode().upper()
        self.commands[name] += 1
        with self.lock:
            if name == "PING":
                return b"+PONG\r\n"
            if name == "SELECT":
                ns = args[1].decode()
                if ns not in self.data:
                    return b"-Namespace not found\r\n"
                password = self.passwords.get(ns)
                given = args[2].decode() if len(args) > 2 else None
                if given is not None and given != password:
                    return b"-Access denied\r\n"
                state["ns"], state["writable"] = ns, password is None or given == password
                return b"+OK\r\n"
            store = self.data[state["ns"]]
            if name == "GET":
                value = store.get(args[1])
                return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
            if name == "EXISTS":
                return b":%d\r\n" % (args[1] in store)
            if name == "SET":
                if not state["writable"]:
                    return b"-Namespace is protected\r\n"
                store[args[1]] = args[2]
                return b"$%d\r\n%s\r\n" % (len(args[1]), args[1])
        return b"-Unknown command\r\n"

    def drop_clients(self) -> None:
        """Close every client connection, as a restarting server would."""
        for client in self.clients:
            client.shutdown(socket.SHUT_RDWR)
        self.clients.clear()

    def add_namespace(self, name: str, password: str | None = None) -> None:
        self.data[name] = {}
        if password is not None:
            self.passwords[name] = password

    def start(self) -> FakeZdb:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
