"""Mutual TLS for the agent's gRPC endpoint, and a dev PKI generator.

The agent only accepts clients whose certificate chains to the configured CA, so the
controller needs a client certificate from that CA; plaintext exists only behind the
explicit ``--insecure-dev`` flag.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.agent.errors import AgentError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"


class TLSConfigError(AgentError):
    """A certificate or key file is missing or unreadable."""


@dataclass(frozen=True)
class ServerTLS:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClientTLS:
    ca: Path
    cert: Path
    key: Path
    # The name the server certificate is checked against (defaults to the host part).
    server_name: str | None = None

    @classmethod
    def from_dir(cls, directory: Path, server_name: str | None = None) -> ClientTLS:
        return cls(
            directory / CA_CERT, directory / CLIENT_CERT, directory / CLIENT_KEY, server_name
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from exc


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """Credentials that demand and verify a client certificate signed by ``tls.ca``."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key, "server key"), _read(tls.cert, "server certificate"))],
        root_certificates=_read(tls.ca, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "CA certificate"),
        private_key=_read(tls.key, "client key"),
        certificate_chain=_read(tls.cert, "client certificate"),
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zmachine-operator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_pair(
    directory: Path,
    cert_name: str,
    key_name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    key_path = directory / key_name
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    (directory / cert_name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
    sans: Sequence[str] = (),
    days: int = 365,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        alt: list[x509.GeneralName] = []
        for san in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                alt.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_dev_pki(
    directory: Path,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    client_name: str = "zmachine-controller",
) -> ServerTLS:
    """Write a fresh CA plus one server and one client certificate into ``directory``.

    For development and tests only: production nodes get their certificates from the
    cluster's PKI. Returns the server side; the client side is ``ClientTLS.from_dir``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _sign("zmachine-agent dev CA", ca_key, None, ca_key, None, days=3650)
    _write_pair(directory, CA_CERT, CA_KEY, ca, ca_key)
    server_key = _key()
    server = _sign(
        server_names[0], server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, server_names
    )
    _write_pair(directory, SERVER_CERT, SERVER_KEY, server, server_key)
    client_key = _key()
    client = _sign(client_name, client_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_pair(directory, CLIENT_CERT, CLIENT_KEY, client, client_key)
    return ServerTLS(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
