"""TLS between clients and sqlproxy: a given certificate, or a generated and reused CA."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509

from sqlproxy.certs import Authority, key_pem, pem
from sqlproxy.config import Config, ConfigError

logger = logging.getLogger(__name__)

CA_FILE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# A generated server certificate is replaced when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)


def default_sans(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """default_sans are the names a generated certificate covers: local ones plus extras."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return tuple(dict.fromkeys(n for n in names if n))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _covers(cert: x509.Certificate, sans: tuple[str, ...]) -> bool:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in ext.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in ext.get_values_for_type(x509.IPAddress)}
    return set(sans) <= have


def ensure_generated(directory: Path, sans: tuple[str, ...]) -> tuple[Path, Path]:
    """ensure_generated makes (or reuses) DIR/ca.pem and a server certificate signed by it.

    The CA is created once and kept, so clients can trust DIR/ca.pem for good; the server
    certificate is reissued when it is missing, near expiry, or lacks a requested name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, ca_key = directory / CA_FILE, directory / CA_KEY
    if ca_file.exists() and ca_key.exists():
        authority = Authority.load(ca_file.read_bytes(), ca_key.read_bytes())
    else:
        authority = Authority.create("sqlproxy client TLS CA")
        _write_private(ca_key, key_pem(authority.key))
        ca_file.write_text(pem(authority.cert))
        logger.info("client TLS: created CA %s (give it to clients as their root cert)", ca_file)
    cert_file, key_file = directory / SERVER_CERT, directory / SERVER_KEY
    if cert_file.exists() and key_file.exists():
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
        if fresh and _covers(cert, sans) and cert.issuer == authority.cert.subject:
            return cert_file, key_file
    key, cert = authority.server_identity("sqlproxy", sans, days=825)
    _write_private(key_file, key_pem(key))
    cert_file.write_text(pem(cert) + pem(authority.cert))
    logger.info("client TLS: issued %s for %s", cert_file, ", ".join(sans))
    return cert_file, key_file


def server_context(config: Config) -> ssl.SSLContext | None:
    """server_context is the TLS context for clients, or None when client TLS is off."""
    if config.client_tls_dir:
        cert, key = ensure_generated(
            Path(config.client_tls_dir), default_sans(config.client_tls_san)
        )
    elif config.client_tls_cert and config.client_tls_key:
        cert, key = Path(config.client_tls_cert), Path(config.client_tls_key)
    else:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the client TLS certificate {cert}: {exc}") from None
    return ctx
