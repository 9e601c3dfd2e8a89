"""The broker's side of TLS: its certificate, the mutual-TLS context, and small per-connection
buffers.

The handshake itself runs in :func:`enrollment.tls.serve_tls`, which reports each refused
handshake with OpenSSL's reason; :func:`handshake_label` folds those reasons into the few labels
``/metrics`` counts by.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from asyncio import sslproto
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import profiles
from enrollment.ca import ca_paths, load_ca
from enrollment.config import Config
from enrollment.keyfiles import load_certificates, write_certificates, write_private_key
from enrollment.tls import server_context

OP_PRIORITIZE_CHACHA = 0x00200000
"""OpenSSL's SSL_OP_PRIORITIZE_CHACHA, which Python 3.11's ``ssl`` does not name: the server
picks ChaCha20-Poly1305 when the client lists it first (a client without AES instructions)."""

TLS_READ_BUFFER = 4 * 1024
"""asyncio allocates 256 KiB per TLS connection for reads; device packets are small, and at
4 KiB an idle mutual-TLS connection measured 62 KiB of broker RSS instead of 73 KiB at 16 KiB
(1,000 connections)."""

_RENEW_BEFORE = dt.timedelta(days=30)
_HANDSHAKE_LABELS = (
    ("no certificate", "no_client_certificate"),
    ("expired", "certificate_expired"),
    ("not yet valid", "certificate_not_yet_valid"),
    ("unable to get local issuer", "unknown_ca"),
    ("self-signed", "unknown_ca"),
    ("self signed", "unknown_ca"),
    ("purpose", "wrong_purpose"),
    ("timed out", "timeout"),
    ("version", "protocol_version"),
    ("unsupported protocol", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
)


def ensure_broker_certificate(config: Config) -> tuple[Path, Path]:
    """``ca/broker.crt`` (with the issuing CA) and ``ca/broker.key`` for ``broker.server_names``.

    Issued by the fleet CA when missing, naming other hosts, or within 30 days of expiry; only
    then does the broker need the CA passphrase.
    """
    directory = ca_paths(config).directory
    cert_path, key_path = directory / "broker.crt", directory / "broker.key"
    names = config.broker.server_names
    now = dt.datetime.now(dt.UTC)
    if cert_path.exists() and key_path.exists():
        current = load_certificates(cert_path)[0]
        if _names(current) == set(names) and current.not_valid_after_utc - now > _RENEW_BEFORE:
            return cert_path, key_path
    ca = load_ca(config)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        profiles.SERVER,
        profiles.server_subject(names),
        key.public_key(),
        dt.timedelta(days=config.ca.server_validity_days),
    )
    write_private_key(key_path, key)
    write_certificates(cert_path, [cert, ca.anchors.issuing])
    return cert_path, key_path


def _names(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return set(sans.get_values_for_type(x509.DNSName)) | ips


def broker_context(config: Config, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 (1.2 only if ``broker.allow_tls12``), client certificate required and verified
    against the fleet CA chain, AEAD only, no compression or renegotiation, ChaCha20 honoured."""
    context = server_context(
        cert_chain=cert,
        key=key,
        client_ca=ca_paths(config).chain,
        client_cert="required",
        allow_tls12=config.broker.allow_tls12,
    )
    context.options |= OP_PRIORITIZE_CHACHA
    return context


def shrink_read_buffer(transport: asyncio.BaseTransport, size: int = TLS_READ_BUFFER) -> None:
    """Replace asyncio's 256 KiB TLS read buffer of this connection with ``size`` bytes.

    ``SSLProtocol`` reads at most ``max_size`` bytes at a time into ``_ssl_buffer``; both are
    per instance once set here, so other TLS servers in the process are unaffected.
    """
    protocol = getattr(transport, "_ssl_protocol", None)
    if not isinstance(protocol, sslproto.SSLProtocol) or protocol.max_size <= size:
        return
    buffer = bytearray(size)
    setattr(protocol, "max_size", size)  # noqa: B010 - a ClassVar in typeshed, per instance here
    setattr(protocol, "_ssl_buffer", buffer)  # noqa: B010
    setattr(protocol, "_ssl_buffer_view", memoryview(buffer))  # noqa: B010


def handshake_label(reason: str) -> str:
    """A metrics label for a refused handshake's reason (a closed set, unlike the reasons)."""
    lowered = reason.lower()
    for needle, label in _HANDSHAKE_LABELS:
        if needle in lowered:
            return label
    return "other"
