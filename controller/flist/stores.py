"""Block stores (``dir://``, ``http(s)://``, ``zdb://``, ``s3://``) and the router over them."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from redis.asyncio import ConnectionPool, Redis, UnixDomainSocketConnection
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import ResponseError as RedisResponseError

from controller.flist.chunks import MAX_STORED_BLOCK
from controller.flist.errors import BlockMissingError, StoreError

DEFAULT_ZDB_PORT = 9900
TIMEOUT = 30.0
T = TypeVar("T")
S3_SCHEMES = ("s3", "s3s", "s3+tls", "s3s+tls")
_SHARD = re.compile(r"[0-9a-f]{2}")
_BLOCK = re.compile(r"[0-9a-f]{64}|[0-9a-f]{32}")  # v2 and v1 ids
_SPEC = re.compile(r"^(?:([0-9a-fA-F]{2})-([0-9a-fA-F]{2})=)?(.+)$")


class Store(Protocol):
    url: str

    def get(self, block_id: bytes) -> bytes | None:
        """The stored bytes, or None if this store does not have the block."""

    def exists(self, block_id: bytes) -> bool: ...

    def set(self, block_id: bytes, data: bytes) -> None: ...

    def close(self) -> None: ...


def strip_password(url: str) -> str:
    """The URL without its password (the user name is kept), as rfs records routes."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class DirStore:
    """``dir:///root``: block at ``root/<hex>``, the layout rfs v2.0.6 (what zos runs) reads.

    Reads also find ``root/<hex[:2]>/<hex>``, the layout later rfs code and our releases before
    this one wrote; :func:`migrate_dir_store` moves such blocks to the flat layout.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreError("dir store needs an absolute path: dir:///path", flist=None, path=url)
        self.url = url
        self.root = Path(unquote(parts.path))

    def _paths(self, block_id: bytes) -> tuple[Path, Path]:
        name = block_id.hex()
        return self.root / name, self.root / name[:2] / name

    def get(self, block_id: bytes) -> bytes | None:
        for path in self._paths(block_id):
            try:
                with path.open("rb") as handle:
                    return handle.read(MAX_STORED_BLOCK + 1)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot read {path}: {exc.strerror}", path=self.url) from None
        return None

    def exists(self, block_id: bytes) -> bool:
        return any(path.exists() for path in self._paths(block_id))

    def set(self, block_id: bytes, data: bytes) -> None:
        write_atomic(self._paths(block_id)[0], data)

    def close(self) -> None:
        pass


@dataclass
class MigrateStats:
    moved: int = 0
    duplicates: int = 0  # already present in the flat layout: the nested copy was removed
    skipped: int = 0  # files in a two-hex-digit directory that are not blocks


def migrate_dir_store(root: Path) -> MigrateStats:
    """Move every block from ``root/<hex[:2]>/<hex>`` to ``root/<hex>`` (idempotent).

    Safe while readers run: a rename is atomic and readers look in both places. Emptied
    two-digit directories are removed.
    """
    stats = MigrateStats()
    try:
        subdirs = sorted(p for p in root.iterdir() if _SHARD.fullmatch(p.name) and p.is_dir())
        for subdir in subdirs:
            for block in sorted(subdir.iterdir()):
                if not (_BLOCK.fullmatch(block.name) and block.name[:2] == subdir.name):
                    stats.skipped += 1
                    continue
                flat = root / block.name
                if flat.exists():
                    block.unlink()
                    stats.duplicates += 1
                else:
                    os.rename(block, flat)
                    stats.moved += 1
            with contextlib.suppress(OSError):  # not empty: it keeps what was skipped
                subdir.rmdir()
    except OSError as exc:
        raise StoreError(f"cannot migrate: {exc.strerror}", path=exc.filename) from None
    return stats


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a partial block."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None


class HttpStore:
    """``http(s)://host/prefix``, read-only.

    GET ``prefix/<hex>``, then ``prefix/<hex[:2]>/<hex>``: an http server in front of a dir store
    in either layout (rfs tries the nested one first; ours are flat, so flat saves a round trip).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.base = url.rstrip("/")

    def _fetch(self, address: str) -> bytes | None:
        try:
            with urllib.request.urlopen(address, timeout=TIMEOUT) as response:
                data: bytes = response.read(MAX_STORED_BLOCK + 1)
                return data
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise StoreError(f"GET {address}: HTTP {exc.code}", path=self.url) from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(f"GET {address}: {exc}", path=self.url) from None

    def get(self, block_id: bytes) -> bytes | None:
        name = block_id.hex()
        found = self._fetch(f"{self.base}/{name}")
        return found if found is not None else self._fetch(f"{self.base}/{name[:2]}/{name}")

    def exists(self, block_id: bytes) -> bool:
        return self.get(block_id) is not None

    def set(self, block_id: bytes, data: bytes) -> None:
        raise StoreError("http stores are read-only", path=self.url)

    def close(self) -> None:
        pass


class _LoopThread:
    """One asyncio loop in a daemon thread, shared by every zdb store: the stores are called from
    FUSE and pack worker threads, and redis-py's asyncio client lives on a single loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, awaitable: Awaitable[T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=self._loop.run_forever, name="flist-zdb", daemon=True
                ).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(_wait(awaitable), loop).result()


async def _wait(awaitable: Awaitable[T]) -> T:
    return await awaitable


_LOOP = _LoopThread()


class ZdbStore:
    """``zdb://[user[:pass]@]host[:port][/namespace]`` (or ``zdb:///unix/socket``): 0-db in user
    mode, keys are the raw block ids. redis-py's asyncio client with a connection pool; each new
    connection selects the namespace (``SELECT ns [password]``, 0-db's form)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        namespace = unquote(parts.path.strip("/")) if parts.hostname else ""
        self.namespace = namespace if namespace and namespace != "default" else None
        self.password = unquote(parts.password) if parts.password else None
        common: dict[str, Any] = {
            "max_connections": 16,
            "socket_timeout": TIMEOUT,
            "socket_connect_timeout": TIMEOUT,
            "protocol": 2,
            "driver_info": None,  # no CLIENT SETINFO: 0-db does not know it
            "redis_connect_func": self._on_connect,
            # A pooled connection the server dropped fails once; the retry reconnects.
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError],
        }
        if parts.hostname:
            port = parts.port or DEFAULT_ZDB_PORT
            pool = ConnectionPool(host=parts.hostname, port=port, **common)
        elif parts.path:
            pool = ConnectionPool(
                connection_class=UnixDomainSocketConnection, path=unquote(parts.path), **common
            )
        else:
            raise StoreError("zdb store needs a host or a socket path", path=strip_password(url))
        self._client = Redis(connection_pool=pool)

    async def _on_connect(self, conn: AbstractConnection) -> None:
        await conn.on_connect()
        if self.namespace:
            args = [self.namespace, *([self.password] if self.password else [])]
            await conn.send_command("SELECT", *args)
            reply = await conn.read_response()
            if reply not in (b"OK", "OK"):
                raise RedisConnectionError(f"SELECT {self.namespace}: {reply!r}")

    def _call(self, name: str, awaitable: Awaitable[T]) -> T:
        try:
            return _LOOP.run(awaitable)
        except RedisResponseError as exc:
            raise StoreError(
                f"{name}: server error: {exc}", path=strip_password(self.url)
            ) from None
        except (RedisError, OSError) as exc:
            raise StoreError(
                f"{name}: cannot connect: {exc}", path=strip_password(self.url)
            ) from None

    def get(self, block_id: bytes) -> bytes | None:
        result = self._call("GET", self._client.get(block_id))
        return result if isinstance(result, bytes) else None

    def exists(self, block_id: bytes) -> bool:
        return bool(self._call("EXISTS", self._client.exists(block_id)))

    def set(self, block_id: bytes, data: bytes) -> None:
        self._call("SET", self._client.set(block_id, data))

    def close(self) -> None:
        self._call("close", self._client.aclose(close_connection_pool=True))


class S3Store:
    """``s3://key:secret@host:port/bucket[?region=r]`` (http), ``s3s://``, ``s3+tls://`` or
    ``s3s+tls://`` (https): objects named by the hex id, path-style, signed with AWS SigV4.

    Parsed as rfs parses them: the port is required, key and secret are the user and password.
    Without a secret (routes are stored without passwords) requests go unsigned, for a bucket
    that allows anonymous reads. Without ``region`` we sign for us-east-1, S3's default.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        shown = strip_password(url)
        tls = parts.scheme in ("s3s", "s3+tls", "s3s+tls")
        try:
            port = parts.port
        except ValueError:
            raise StoreError("bad port in s3 store URL", path=shown) from None
        if not parts.hostname or port is None:
            raise StoreError("s3 store needs host:port (as rfs)", path=shown)
        self.bucket = parts.path.strip("/")
        if not self.bucket or "/" in self.bucket:
            raise StoreError("s3 store needs one bucket name as its path", path=shown)
        self.host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.host = f"{self.host}:{port}"
        self.base = f"{'https' if tls else 'http'}://{self.host}/{quote(self.bucket)}"
        self.access_key = unquote(parts.username or "")
        self.secret = unquote(parts.password) if parts.password else None
        self.region = parse_qs(parts.query).get("region", ["us-east-1"])[0] or "us-east-1"

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        payload = hashlib.sha256(body).hexdigest()
        now = datetime.datetime.now(datetime.UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {"host": self.host, "x-amz-content-sha256": payload, "x-amz-date": stamp}
        if self.secret is None:
            return headers
        names = ";".join(sorted(headers))
        canonical = "\n".join(
            [method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", names, payload]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{self.secret}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope},"
            f" SignedHeaders={names}, Signature={signature}"
        )
        return headers

    def _request(self, method: str, block_id: bytes, body: bytes = b"") -> bytes | None:
        address = f"{self.base}/{block_id.hex()}"
        path = urlsplit(address).path
        request = urllib.request.Request(
            address, data=body if method == "PUT" else None, method=method
        )
        for name, value in self._headers(method, path, body).items():
            if name != "host":
                request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                data: bytes = response.read(MAX_STORED_BLOCK + 1)
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read(512).decode("utf-8", "replace")
            code = re.search(r"<Code>([^<]*)</Code>", detail)
            if exc.code == 404 and not (code and code.group(1) == "NoSuchBucket"):
                return None
            reason = f"HTTP {exc.code}" + (f" {code.group(1)}" if code else "")
            raise StoreError(
                f"{method} {block_id.hex()}: {reason}", path=strip_password(self.url)
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(
                f"{method} {block_id.hex()}: {exc}", path=strip_password(self.url)
            ) from None

    def get(self, block_id: bytes) -> bytes | None:
        return self._request("GET", block_id)

    def exists(self, block_id: bytes) -> bool:
        return self._request("HEAD", block_id) is not None

    def set(self, block_id: bytes, data: bytes) -> None:
        self._request("PUT", block_id, data)

    def close(self) -> None:
        pass


def open_store(url: str) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "dir":
        return DirStore(url)
    if scheme in ("http", "https"):
        return HttpStore(url)
    if scheme == "zdb":
        return ZdbStore(url)
    if scheme in S3_SCHEMES:
        return S3Store(url)
    raise StoreError(f"unsupported store scheme {scheme!r}", path=strip_password(url))


@dataclass(frozen=True)
class StoreRoute:
    start: int
    end: int
    store: Store


def parse_spec(spec: str) -> tuple[int, int, str]:
    """``[xx-yy=]url`` -> (start, end, url); no range means 00-ff."""
    match = _SPEC.match(spec)
    if match is None:
        raise StoreError("bad store spec, expected [xx-yy=]url", path=spec)
    start, end, url = match.groups()
    first, last = (int(start, 16), int(end, 16)) if start else (0, 255)
    if first > last:
        raise StoreError(f"empty range {start}-{end}", path=strip_password(url))
    return first, last, url


class Router:
    """Writes a block to every store whose range covers ``id[0]``; reads from the first that has
    it."""

    def __init__(self, routes: list[StoreRoute], label: str | None = None) -> None:
        self.routes = routes
        self.label = label

    @classmethod
    def from_specs(cls, specs: list[str] | tuple[str, ...], label: str | None = None) -> Router:
        routes = []
        for spec in specs:
            start, end, url = parse_spec(spec)
            routes.append(StoreRoute(start, end, open_store(url)))
        return cls(routes, label)

    def _matching(self, block_id: bytes) -> list[Store]:
        return [r.store for r in self.routes if r.start <= block_id[0] <= r.end]

    def get(self, block_id: bytes, path: str | None = None) -> bytes:
        failures = []
        for store in self._matching(block_id):
            try:
                data = store.get(block_id)
            except StoreError as exc:
                failures.append(f"{strip_password(store.url)}: {exc.reason}")
                continue
            if data is not None:
                return data
            failures.append(f"{strip_password(store.url)}: not found")
        detail = "; ".join(failures) or "no store covers it"
        raise BlockMissingError(
            f"block {block_id.hex()} missing ({detail})", flist=self.label, path=path
        )

    def put(self, block_id: bytes, data: bytes) -> int:
        """Store the block where it is missing; returns how many stores were written."""
        stores = self._matching(block_id)
        if not stores:
            raise StoreError(f"no store covers block {block_id.hex()}", flist=self.label)
        written = 0
        for store in stores:
            if not store.exists(block_id):
                store.set(block_id, data)
                written += 1
        return written

    def close(self) -> None:
        for route in self.routes:
            route.store.close()
