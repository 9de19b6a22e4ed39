"""A minimal RESP (redis protocol) client, enough for 0-db: SELECT, GET, SET, EXISTS, PING."""

from __future__ import annotations

import socket
from typing import Any

MAX_BULK = 8 << 20  # 0-db's payload limit


class RespError(Exception):
    """Protocol violation, connection failure or an error reply."""


class RespReplyError(RespError):
    """The server answered with an error (the connection itself is fine)."""


class RespConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    @classmethod
    def connect(cls, host: str, port: int, unix_path: str | None, timeout: float) -> RespConnection:
        try:
            if unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(unix_path)
            else:
                sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise RespError(f"cannot connect: {exc}") from None
        return cls(sock)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def command(self, *args: bytes | str) -> Any:
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        payload = b"".join(
            [f"*{len(parts)}\r\n".encode()]
            + [f"${len(p)}\r\n".encode() + p + b"\r\n" for p in parts]
        )
        try:
            self.sock.sendall(payload)
            return self._reply()
        except OSError as exc:
            raise RespError(f"connection failed: {exc}") from None

    def _line(self) -> bytes:
        line = self.reader.readline(1 << 16)
        if not line.endswith(b"\r\n"):
            raise RespError("connection closed or bad reply line")
        return line[:-2]

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespReplyError(f"server error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            if size > MAX_BULK:
                raise RespError(f"bulk reply of {size} bytes")
            data = self.reader.read(size + 2)
            if len(data) != size + 2:
                raise RespError("truncated bulk reply")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(min(count, 1024))]
        raise RespError(f"unexpected reply {line[:32]!r}")
