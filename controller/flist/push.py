"""``zmachine-flist push``: stream a tar or image archive to a zmachine-hub, with a progress bar."""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from controller.flist.errors import FlistFetchError

_CHUNK = 1 << 20
_SUFFIXES = re.compile(r"(\.tar(\.gz|\.zst)?|\.tgz|\.oci)$")


def flist_name(path: Path) -> str:
    """``debian-12.tar.gz`` -> ``debian-12``: the hub's name rules (lowercase, no spaces)."""
    name = _SUFFIXES.sub("", path.name).lower()
    return re.sub(r"[^a-z0-9._-]", "-", name).strip("-.") or "flist"


def _bar(sent: int, total: int, started: float) -> str:
    fraction = sent / total if total else 1.0
    filled = int(fraction * 30)
    rate = sent / max(time.monotonic() - started, 1e-6) / 2**20
    return (
        f"[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}%"
        f" {sent / 2**20:.1f}/{total / 2**20:.1f} MiB {rate:.1f} MiB/s"
    )


def push(path: Path, hub: str, name: str, token: str, progress: bool = True) -> dict[str, Any]:
    """Upload ``path`` as ``name``; returns the hub's answer (``flist`` is the new flist's URL).

    The hub packs after the last byte; the bar then waits at 100% until it answers."""
    parts = urlsplit(hub.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlistFetchError("hub URL must be http(s)://host[:port]", flist=hub)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    try:
        total = path.stat().st_size
        conn = connection_class(parts.netloc, timeout=3600)
        started, last = time.monotonic(), 0.0
        tty = sys.stderr.isatty()
        try:
            conn.putrequest("PUT", f"{parts.path}/api/flists/{quote(name)}")
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(total))
            conn.endheaders()
            sent = 0
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    try:
                        conn.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the hub refused early (e.g. 413): its answer says why
                    sent += len(chunk)
                    now = time.monotonic()
                    if progress and (now - last > 0.2 or sent == total):
                        last = now
                        end = "" if tty and sent < total else "\n"
                        sys.stderr.write(("\r" if tty else "") + _bar(sent, total, started) + end)
                        sys.stderr.flush()
            if progress and sent == total:
                sys.stderr.write("uploaded; the hub is packing it\n")
            response = conn.getresponse()
            body = response.read(1 << 20)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise FlistFetchError(f"upload failed: {exc}", flist=hub, path=str(path)) from None
    if response.status != 201:
        detail = body.decode("utf-8", "replace").strip()
        raise FlistFetchError(f"hub answered HTTP {response.status}: {detail}", flist=hub)
    result: dict[str, Any] = json.loads(body)
    return result
