"""The s3 store against a real S3 server: versitygw (posix backend), built from its Go module by
hack/build-versitygw.sh. Plain http (s3://) and TLS (s3s://, s3s+tls://) with a test CA."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.flist.chunks import CHUNK_SIZE, encode_v2
from controller.flist.errors import StoreError
from controller.flist.meta import open_flist
from controller.flist.pack import pack
from controller.flist.stores import Router, S3Store
from hack.controlplane import free_port
from tests.flist.conftest import assert_same_tree, make_tree, run_cli

REPO = Path(__file__).resolve().parents[2]
KEY, SECRET = "flist-key", "flist-secret/+="  # characters that need quoting in a URL


def _versitygw() -> str:
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "build-versitygw.sh")], stdout=subprocess.PIPE, text=True
    )
    assert done.returncode == 0, "hack/build-versitygw.sh failed; see its output above"
    return done.stdout.strip()


@dataclass
class S3Server:
    port: int
    root: Path
    process: subprocess.Popen[bytes]

    def url(self, scheme: str = "s3", bucket: str = "blocks", secret: str | None = SECRET) -> str:
        auth = KEY if secret is None else f"{KEY}:{quote(secret, safe='')}"
        return f"{scheme}://{auth}@127.0.0.1:{self.port}/{bucket}"


def _serve(tmp: Path, tls: tuple[Path, Path] | None = None) -> S3Server:
    root = tmp / "s3root"
    (root / "blocks").mkdir(parents=True)  # the posix backend: a directory is a bucket
    port = free_port()
    argv = [_versitygw(), "--access", KEY, "--secret", SECRET, "--port", f"127.0.0.1:{port}"]
    if tls is not None:
        argv += ["--cert", str(tls[0]), "--key", str(tls[1])]
    log = (tmp / "versitygw.log").open("wb")
    process = subprocess.Popen([*argv, "posix", str(root)], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return S3Server(port, root, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    f"versitygw did not start: {(tmp / 'versitygw.log').read_text()}"
                ) from None
            time.sleep(0.1)


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = _serve(tmp_path)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


def _test_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flist test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_pack_unpack_through_s3(s3: S3Server, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", files=40, large=(CHUNK_SIZE * 2 + 3,))
    stats = pack(source, tmp_path / "t.fl", [s3.url()])
    objects = sorted(p.name for p in (s3.root / "blocks").iterdir() if not p.name.startswith("."))
    assert len(objects) == stats.blocks_written == stats.blocks > 0
    assert all(len(name) == 64 for name in objects)  # hex ids, one object each
    assert pack(source, tmp_path / "t2.fl", [s3.url()]).blocks_written == 0  # HEAD first
    with open_flist(tmp_path / "t.fl") as flist:
        (spec,) = flist.store_specs()
        assert spec == f"00-ff={s3.url(secret=None)}"  # the secret never lands in the flist
    # Unsigned reads of a private bucket are refused, and the error says so.
    with pytest.raises(StoreError, match="AccessDenied"):
        S3Store(s3.url(secret=None)).get(bytes.fromhex(objects[0]))
    out = tmp_path / "out"
    run_cli(
        "unpack",
        str(tmp_path / "t.fl"),
        str(out),
        "--store",
        s3.url(),
        "--cache",
        str(tmp_path / "c"),
    )
    assert_same_tree(source, out)


def test_s3_store_errors(s3: S3Server) -> None:
    ref, stored = encode_v2(b"block")
    store = S3Store(s3.url())
    assert store.get(ref.id) is None and not store.exists(ref.id)
    store.set(ref.id, stored)
    assert store.get(ref.id) == stored and store.exists(ref.id)
    with pytest.raises(StoreError, match="SignatureDoesNotMatch"):
        S3Store(s3.url(secret="wrong")).get(ref.id)
    with pytest.raises(StoreError, match="NoSuchBucket"):
        S3Store(s3.url(bucket="absent")).get(ref.id)
    for bad, reason in [
        (f"s3://{KEY}:x@127.0.0.1/blocks", "needs host:port"),
        (f"s3://{KEY}:x@127.0.0.1:{s3.port}/", "one bucket name"),
        (f"s3://{KEY}:x@127.0.0.1:{s3.port}/a/b", "one bucket name"),
    ]:
        with pytest.raises(StoreError, match=reason):
            Router.from_specs([bad])
    s3.process.terminate()
    s3.process.wait(timeout=30)
    with pytest.raises(StoreError, match="GET"):
        store.get(ref.id)


def test_s3_over_tls(tmp_path: Path) -> None:
    ca, cert, key = _test_ca(tmp_path)
    server = _serve(tmp_path, tls=(cert, key))
    try:
        source = make_tree(tmp_path / "src", files=10)
        trusted = {"SSL_CERT_FILE": str(ca)}
        for scheme in ("s3s", "s3s+tls", "s3+tls"):
            flist = tmp_path / f"{scheme}.fl"
            run_cli(
                "pack", str(source), "-o", str(flist), "-s", server.url(scheme), "-q", env=trusted
            )
            out = tmp_path / f"out-{scheme}"
            cmd = ["unpack", str(flist), str(out), "--store", server.url(scheme)]
            run_cli(*cmd, "--cache", str(tmp_path / f"cache-{scheme}"), env=trusted)
            assert_same_tree(source, out)
        cmd = ["unpack", str(flist), str(tmp_path / "nope"), "--store", server.url("s3s")]
        untrusted = run_cli(*cmd, "--cache", str(tmp_path / "cache-nope"), check=False)
        assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        plain = S3Store(server.url("s3"))  # http to a TLS port
        with pytest.raises(StoreError, match="GET"):
            plain.get(b"\0" * 32)
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
