"""Chains from hardware evidence to a manufacturer trust store (TPM EK CAs, card attestation CAs).

Built by hand rather than with ``cryptography.x509.verification``: EK and card attestation
certificates are not WebPKI certificates (EK certificates have an empty subject, a critical
directoryName SAN and TCG extensions the WebPKI verifier rejects). What is checked: issuer-name
chaining, each signature, each validity period, and that every issuer is a CA.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment.csr import X509_PARSE_ERRORS
from fleetgate.errors import AttestationRefused, ConfigError

MAX_CHAIN_LENGTH = 5


def load_trust_store(directory: Path) -> list[x509.Certificate]:
    """Every certificate in the ``*.pem`` files of ``directory``; empty if it does not exist."""
    if not directory.exists():
        return []
    anchors: list[x509.Certificate] = []
    for path in sorted(directory.glob("*.pem")):
        try:
            anchors.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        except ValueError as exc:
            raise ConfigError(f"trust store file {path} holds no valid PEM certificate") from exc
    return anchors


def load_certificate(der: bytes, what: str) -> x509.Certificate:
    """A DER certificate from the evidence, or :class:`AttestationRefused` naming ``what``.

    cryptography parses names and extensions on first use; they are read here, so that a
    malformed one is refused as such rather than raising ``ValueError`` in chain building.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.subject, cert.issuer, cert.extensions  # noqa: B018
    except X509_PARSE_ERRORS as exc:
        raise AttestationRefused(f"the {what} is not a DER X.509 certificate ({exc})") from exc
    return cert


def key_fingerprint(cert_or_key: x509.Certificate | PublicKeyTypes) -> str:
    """Hex SHA-256 of a certificate's (or public key's) SubjectPublicKeyInfo."""
    key = cert_or_key.public_key() if isinstance(cert_or_key, x509.Certificate) else cert_or_key
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


def describe(cert: x509.Certificate) -> str:
    """A certificate's subject for messages; EK certificates often have an empty one."""
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    now: dt.datetime,
    what: str,
) -> list[x509.Certificate]:
    """The path ``leaf .. anchor``, or :class:`AttestationRefused` saying which link failed.

    ``what`` names the leaf in messages ("EK certificate", "card attestation certificate").
    """
    if not anchors:
        raise AttestationRefused(
            f"no manufacturer CA is configured to verify the {what}; "
            "put the manufacturer's CA certificate in the trust store directory"
        )
    path = [leaf]
    current = leaf
    pool = list(intermediates)
    while len(path) <= MAX_CHAIN_LENGTH:
        _check_validity(current, now=now, what=what if current is leaf else "issuer certificate")
        anchor = _issued_by(current, anchors)
        if anchor is not None:
            _check_validity(anchor, now=now, what="manufacturer CA certificate")
            return [*path, anchor]
        issuer = _issued_by(current, pool)
        if issuer is None:
            raise AttestationRefused(
                f"the {what} ({describe(leaf)}, issued by "
                f"{current.issuer.rfc4514_string()}) does not chain to a trusted manufacturer "
                "CA; if this hardware is genuine, add its manufacturer's CA to the trust store"
            )
        pool.remove(issuer)
        path.append(issuer)
        current = issuer
    raise AttestationRefused(f"the {what} chain is longer than {MAX_CHAIN_LENGTH} certificates")


def _issued_by(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != cert.issuer or not _is_ca(candidate):
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_validity(cert: x509.Certificate, *, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise AttestationRefused(
            f"the {what} ({describe(cert)}) is not valid until "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z; check the station's clock"
        )
    if now > cert.not_valid_after_utc:
        raise AttestationRefused(
            f"the {what} ({describe(cert)}) expired on {cert.not_valid_after_utc:%Y-%m-%d}Z"
        )
