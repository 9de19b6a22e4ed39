"""Flists from URLs: download once, keep by content hash, verify before anyone uses them.

Cache layout: ``<cache>/<sha256>.fl|.flist`` (the verified files) and ``<cache>/urls/<sha256 of
URL>`` (which file a URL gave last time; http URLs are not downloaded again while it is valid).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import structlog

from controller.flist.errors import FlistError, FlistFetchError
from controller.flist.meta import GZIP_MAGIC, open_flist

log = structlog.get_logger(__name__)
MAX_FLIST_BYTES = 2 << 30
TIMEOUT = 60.0
_READ = 1 << 20


def _suffix(url: str, head: bytes) -> str:
    path = urlsplit(url).path
    if path.endswith(".flist") or head.startswith(GZIP_MAGIC):
        return ".flist"
    return ".fl"


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _copy_limited(source: _Readable, dest: Path, url: str) -> tuple[str, int, bytes]:
    digest = hashlib.sha256()
    size = 0
    head = b""
    with dest.open("wb") as out:
        while chunk := source.read(_READ):
            size += len(chunk)
            if size > MAX_FLIST_BYTES:
                raise FlistFetchError(f"larger than {MAX_FLIST_BYTES} bytes", flist=url)
            head = head or chunk[:16]
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size, head


def _download(url: str, dest: Path) -> tuple[str, int, bytes]:
    scheme = urlsplit(url).scheme
    try:
        if scheme in ("", "file"):
            with open(unquote(urlsplit(url).path), "rb") as handle:
                return _copy_limited(handle, dest, url)
        if scheme in ("http", "https"):
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                expected = response.headers.get("Content-Length")
                result = _copy_limited(response, dest, url)
                if expected is not None and int(expected) != result[1]:
                    raise FlistFetchError(
                        f"truncated download: {result[1]} of {expected} bytes", flist=url
                    )
                return result
    except urllib.error.HTTPError as exc:
        raise FlistFetchError(f"HTTP {exc.code}", flist=url) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise FlistFetchError(f"download failed: {exc}", flist=url) from None
    raise FlistFetchError(f"unsupported URL scheme {scheme!r}", flist=url)


def _known(index: Path, cache_dir: Path) -> Path | None:
    """The file an earlier fetch of this URL produced, if it is still there and intact."""
    try:
        name = index.read_text().strip()
    except OSError:
        return None
    path = cache_dir / name
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None
    return path if path.name.split(".")[0] == digest else None


def fetch_flist(url: str, cache_dir: Path) -> Path:
    """A local, verified copy of the flist at ``url`` (``file://``, ``http(s)://`` or a path)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = cache_dir / "urls" / hashlib.sha256(url.encode()).hexdigest()
    if urlsplit(url).scheme in ("http", "https"):
        known = _known(index, cache_dir)
        if known is not None:
            return known
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".download-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        digest, size, head = _download(url, tmp)
        if size == 0:
            raise FlistFetchError("empty file", flist=url)
        try:
            open_flist(tmp, deep_check=True).close()
        except FlistError as exc:
            raise FlistFetchError(f"not a valid flist: {exc.reason}", flist=url) from None
        final = cache_dir / f"{digest}{_suffix(url, head)}"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    index.parent.mkdir(exist_ok=True)
    fd, tmp_index = tempfile.mkstemp(dir=index.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(final.name)
    os.replace(tmp_index, index)
    log.info("fetched flist", url=url, path=str(final), bytes=size)
    return final
