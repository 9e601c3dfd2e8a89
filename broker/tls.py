"""The broker's side of TLS: its certificate, the mutual-TLS context, and small per-connection
buffers.

The handshake itself runs in :func:`enrollment.tls.serve_tls`, which reports each refused
handshake with OpenSSL's reason; :func:`handshake_label` folds those reasons into the few labels
``/metrics`` counts by.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from enrollment.ca import ServerCredentials, ca_paths
from enrollment.config import Config
from enrollment.tls import server_context

OP_PRIORITIZE_CHACHA = 0x00200000
"""OpenSSL's SSL_OP_PRIORITIZE_CHACHA, which Python 3.11's ``ssl`` does not name: the server
picks ChaCha20-Poly1305 when the client lists it first (a client without AES instructions)."""

TLS_READ_BUFFER = 4 * 1024
"""asyncio allocates 256 KiB per TLS connection for reads; device packets are small. Sized at
the listener (``serve_tls(read_buffer_size=...)``), an idle mutual-TLS connection measured
48-50 KiB of broker RSS in ``make bench-broker`` (5,000 and 1,000 connections)."""

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


def broker_credentials(config: Config) -> ServerCredentials:
    """``ca/broker.crt`` (+ issuing CA) and ``ca/broker.key``, for ``broker.server_names``."""
    directory = ca_paths(config).directory
    return ServerCredentials(
        directory / "broker.crt", directory / "broker.key", config.broker.server_names
    )


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


def handshake_label(reason: str) -> str:
    """A metrics label for a refused handshake's reason (a closed set, unlike the reasons)."""
    lowered = reason.lower()
    for needle, label in _HANDSHAKE_LABELS:
        if needle in lowered:
            return label
    return "other"
