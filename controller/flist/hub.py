"""``zmachine-hub``: a small flist hub. Users upload a root filesystem tar or a container image
archive with a bearer token; the hub packs it into its own block store and serves the flists
(``/<user>/<name>.fl``) and their blocks (``/blocks/<hex>`` and ``/blocks/<hex[:2]>/<hex>``, the
layouts our ``http://`` store and rfs's http store read) to anyone, and lists what it holds.

Tokens: a static token file (``TOKEN USER`` per line), or, in a cluster, Kubernetes
ServiceAccount tokens checked with a TokenReview (user ``<namespace>.<serviceaccount>``).
Layout under ``--root``: ``flists/<user>/<name>.fl``, ``blocks/<hex>`` (a flat ``dir://`` store),
``uploads/`` (partial uploads, removed when done).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from controller.flist.archive import pack_source
from controller.flist.errors import FlistError
from controller.logs import configure_logging

log = structlog.get_logger(__name__)
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
BLOCK = re.compile(r"[0-9a-f]{64}|[0-9a-f]{32}")
MiB = 1 << 20
_SA_USER = re.compile(r"system:serviceaccount:([a-z0-9.-]+):([a-z0-9.-]+)")


class AuthError(Exception):
    """The request's token is missing or not accepted."""


class AuthUnavailable(Exception):
    """Tokens cannot be checked right now (e.g. the TokenReview call failed)."""


class Authenticator:
    async def user(self, token: str) -> str:
        raise NotImplementedError


class StaticTokens(Authenticator):
    """``TOKEN USER`` per line; ``#`` comments. Compared in constant time."""

    def __init__(self, path: Path) -> None:
        self.tokens: list[tuple[bytes, str]] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or not NAME.fullmatch(fields[1]):
                raise ValueError(f"{path}:{number}: expected 'TOKEN USER' with a lowercase user")
            self.tokens.append((fields[0].encode(), fields[1]))

    async def user(self, token: str) -> str:
        given = token.encode()
        found = [user for known, user in self.tokens if hmac.compare_digest(known, given)]
        if not found:
            raise AuthError("unknown token")
        return found[0]


class TokenReviewer(Authenticator):
    """Kubernetes TokenReview with the hub's own ServiceAccount (needs the ``system:auth-delegator``
    ClusterRole); accepts ServiceAccount tokens only, audience ``audience`` if given."""

    def __init__(self, audience: str | None, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        if kubeconfig:
            config.load_kube_config(kubeconfig)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        self.api = client.AuthenticationV1Api()
        self.client = client
        self.audience = audience

    def _review(self, token: str) -> str:
        spec = self.client.V1TokenReviewSpec(
            token=token, audiences=[self.audience] if self.audience else None
        )
        try:
            review = self.api.create_token_review(self.client.V1TokenReview(spec=spec))
        except self.client.ApiException as exc:
            raise AuthUnavailable(f"TokenReview failed: HTTP {exc.status} {exc.reason}") from None
        status = review.status
        if not status or not status.authenticated or not status.user:
            raise AuthError(f"token not authenticated: {status.error if status else 'no status'}")
        match = _SA_USER.fullmatch(status.user.username or "")
        if match is None:
            raise AuthError("only ServiceAccount tokens may upload")
        return f"{match.group(1)}.{match.group(2)}"

    async def user(self, token: str) -> str:
        return await asyncio.to_thread(self._review, token)


@dataclass
class HubConfig:
    root: Path
    public_url: str  # how clients reach this hub; recorded in each flist's route
    auth: Authenticator
    max_upload: int = 8 << 30


class Hub:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.flists = config.root / "flists"
        self.blocks = config.root / "blocks"
        self.uploads = config.root / "uploads"
        for directory in (self.flists, self.blocks, self.uploads):
            directory.mkdir(parents=True, exist_ok=True)
        self.pack_lock = asyncio.Lock()  # one pack at a time: it uses every core it gets

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 * MiB)
        app.router.add_put("/api/flists/{name}", self.upload)
        app.router.add_post("/api/flists/{name}", self.upload)
        app.router.add_get("/api/flists", self.listing)
        app.router.add_get("/api/flists/{user}", self.listing)
        app.router.add_get("/blocks/{shard}/{block}", self.block)
        app.router.add_get("/blocks/{block}", self.block)
        app.router.add_get("/{user}/{name}.fl", self.flist)
        app.router.add_get("/healthz", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _user(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise web.HTTPUnauthorized(
                text="an upload needs 'Authorization: Bearer TOKEN'\n",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            return await self.config.auth.user(token.strip())
        except AuthError as exc:
            log.warning("upload refused", reason=str(exc), peer=request.remote)
            raise web.HTTPUnauthorized(
                text="token not accepted\n", headers={"WWW-Authenticate": "Bearer"}
            ) from None
        except AuthUnavailable as exc:
            log.error("cannot check tokens", reason=str(exc))
            raise web.HTTPServiceUnavailable(text="the hub cannot check tokens now\n") from None

    async def upload(self, request: web.Request) -> web.Response:
        user = await self._user(request)
        name = request.match_info["name"].removesuffix(".fl")
        if not NAME.fullmatch(name):
            raise web.HTTPBadRequest(
                text=f"flist name {name!r}: lowercase letters, digits, '.', '_', '-' only\n"
            )
        size = request.content_length
        if size is not None and size > self.config.max_upload:
            raise web.HTTPRequestEntityTooLarge(max_size=self.config.max_upload, actual_size=size)
        fd, tmp = tempfile.mkstemp(dir=self.uploads, prefix=f"{user}-{name}-")
        upload = Path(tmp)
        try:
            received = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.content.iter_chunked(MiB):
                    received += len(chunk)
                    if received > self.config.max_upload:
                        raise web.HTTPRequestEntityTooLarge(
                            max_size=self.config.max_upload, actual_size=received
                        )
                    await asyncio.to_thread(out.write, chunk)
            if size is not None and received != size:
                raise web.HTTPBadRequest(text=f"upload truncated: {received} of {size} bytes\n")
            packed = upload.with_name(upload.name + ".fl")
            started = time.monotonic()
            async with self.pack_lock:
                stats, image = await asyncio.to_thread(
                    pack_source, upload, packed, [f"dir://{self.blocks}"]
                )
            # Routed to this hub before it is visible, so no reader sees the local route.
            await asyncio.to_thread(self._publish, packed, self.flists / user / f"{name}.fl")
        except FlistError as exc:
            raise web.HTTPBadRequest(text=f"cannot pack the upload: {exc.reason}\n") from None
        finally:
            await asyncio.to_thread(upload.unlink, True)
            await asyncio.to_thread(upload.with_name(upload.name + ".fl").unlink, True)
        log.info(
            "flist uploaded",
            user=user,
            flist=name,
            bytes=received,
            files=stats.files,
            blocks_written=stats.blocks_written,
            seconds=round(time.monotonic() - started, 2),
        )
        return web.json_response(
            {
                "flist": f"{self.config.public_url}/{user}/{name}.fl",
                "files": stats.files,
                "bytes": stats.bytes,
                "blocks": stats.blocks,
                "blocks_written": stats.blocks_written,
                "tags": image.tags() if image else {},
            },
            status=201,
        )

    def _publish(self, packed: Path, target: Path) -> None:
        """Route the flist to this hub (readers fetch blocks over HTTP, not from the hub's
        directory), then rename it into place."""
        conn = sqlite3.connect(packed)
        try:
            conn.execute("DELETE FROM route")
            conn.execute(
                "INSERT INTO route (start, end, url) VALUES (0, 255, ?)",
                (f"{self.config.public_url}/blocks",),
            )
            conn.commit()
        finally:
            conn.close()
        target.parent.mkdir(exist_ok=True)
        os.replace(packed, target)

    async def listing(self, request: web.Request) -> web.Response:
        only = request.match_info.get("user")
        if only is not None and not NAME.fullmatch(only):
            raise web.HTTPNotFound()
        found = []
        for path in sorted(self.flists.glob("*/*.fl")):
            user = path.parent.name
            if only is not None and user != only:
                continue
            st = path.stat()
            found.append(
                {
                    "user": user,
                    "name": path.stem,
                    "url": f"{self.config.public_url}/{user}/{path.name}",
                    "size": st.st_size,
                    "updated": int(st.st_mtime),
                }
            )
        return web.json_response(found)

    async def flist(self, request: web.Request) -> web.StreamResponse:
        user, name = request.match_info["user"], request.match_info["name"]
        if not (NAME.fullmatch(user) and NAME.fullmatch(name)):
            raise web.HTTPNotFound()
        path = self.flists / user / f"{name}.fl"
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def block(self, request: web.Request) -> web.StreamResponse:
        block = request.match_info["block"]
        shard = request.match_info.get("shard")
        if not BLOCK.fullmatch(block) or (shard is not None and shard != block[:2]):
            raise web.HTTPNotFound()
        path = self.blocks / block
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmachine-hub", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="flists, blocks and uploads")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT")
    parser.add_argument(
        "--public-url", required=True, help="the URL clients reach this hub at (flist routes)"
    )
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token-file", type=Path, help="static tokens: 'TOKEN USER' per line")
    auth.add_argument(
        "--token-review",
        action="store_true",
        help="check ServiceAccount tokens with the Kubernetes TokenReview API",
    )
    parser.add_argument("--audience", help="with --token-review: the audience tokens must carry")
    parser.add_argument("--kubeconfig", help="with --token-review, outside a cluster")
    parser.add_argument("--max-upload-mib", type=int, default=8192)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging("INFO", json=True)
    try:
        auth: Authenticator = (
            StaticTokens(args.token_file)
            if args.token_file
            else TokenReviewer(args.audience, args.kubeconfig)
        )
    except (OSError, ValueError) as exc:
        print(f"zmachine-hub: error: {exc}", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    hub = Hub(HubConfig(args.root, args.public_url.rstrip("/"), auth, args.max_upload_mib * MiB))
    log.info("hub serving", listen=args.listen, root=str(args.root))
    web.run_app(hub.app(), host=host.strip("[]") or None, port=int(port), print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
