"""fetch_flist: file:// and http:// URLs, download once, verify size and format."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.flist.errors import FlistFetchError
from controller.flist.fetch import fetch_flist
from controller.flist.meta import open_flist
from controller.flist.pack import pack

HttpDir = Callable[[Path], tuple[str, list[str]]]


@pytest.fixture
def flist(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello").write_text("hi")
    (tmp_path / "pub").mkdir()
    pack(tmp_path / "src", tmp_path / "pub" / "img.fl", [f"dir://{tmp_path / 'store'}"])
    return tmp_path / "pub" / "img.fl"


def test_file_url(flist: Path, tmp_path: Path) -> None:
    got = fetch_flist(f"file://{flist}", tmp_path / "cache")
    assert got.parent == tmp_path / "cache" and got.suffix == ".fl"
    assert got.read_bytes() == flist.read_bytes()
    assert fetch_flist(str(flist), tmp_path / "cache") == got
    with open_flist(got) as opened:
        assert opened.resolve("/hello")[1].size == 2


def test_http_downloads_once(flist: Path, tmp_path: Path, http_dir: HttpDir) -> None:
    base, requests = http_dir(flist.parent)
    first = fetch_flist(f"{base}/img.fl", tmp_path / "cache")
    second = fetch_flist(f"{base}/img.fl", tmp_path / "cache")
    assert first == second and requests == ["/img.fl"]
    first.write_bytes(b"tampered")  # a damaged cache copy is fetched again
    third = fetch_flist(f"{base}/img.fl", tmp_path / "cache")
    assert third.read_bytes() == flist.read_bytes() and len(requests) == 2


def test_rejects_bad_content(flist: Path, tmp_path: Path, http_dir: HttpDir) -> None:
    (flist.parent / "junk.fl").write_bytes(b"<html>not found</html>")
    base, _ = http_dir(flist.parent)
    with pytest.raises(FlistFetchError, match="not a valid flist"):
        fetch_flist(f"{base}/junk.fl", tmp_path / "cache")
    with pytest.raises(FlistFetchError, match="HTTP 404"):
        fetch_flist(f"{base}/missing.fl", tmp_path / "cache")
    with pytest.raises(FlistFetchError, match="unsupported URL scheme"):
        fetch_flist("ftp://example.invalid/x.fl", tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_file()] == []


@pytest.fixture
def lying_server() -> Iterator[str]:
    """Announces more bytes than it sends (a download cut short)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"SQLite format 3\0" + b"\0" * 100)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cut.fl"
    server.shutdown()
    server.server_close()


def test_truncated_download(lying_server: str, tmp_path: Path) -> None:
    with pytest.raises(FlistFetchError, match=r"flist http://127\.0\.0\.1"):
        fetch_flist(lying_server, tmp_path / "cache")
