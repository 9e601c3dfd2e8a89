"""Certificate rows: how an issued certificate is recorded and how a subject's are withdrawn."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlmodel import Session, col

from enrollment.registry.models import Certificate, CertStatus, SubjectKind, utcnow


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_values(
    cert: x509.Certificate, kind: SubjectKind, subject_id: str, issuer_kid: str | None = None
) -> dict[str, Any]:
    """A new certificate row as plain values (building a SQLModel instance costs ~0.1 ms);
    ``issuer_kid`` spares parsing the extensions (~50 µs) when the caller knows the signer."""
    return {
        "serial": serial_hex(cert.serial_number),
        "subject_kind": kind,
        "subject_id": subject_id,
        "fingerprint_sha256": fingerprint(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "status": CertStatus.ACTIVE,
        "revoked_at": None,
        "revocation_reason": None,
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "issuer_key_id": issuer_kid or issuer_key_id(cert),
    }


def issuer_key_id(cert: x509.Certificate) -> str | None:
    """Which CA signed ``cert``: its authority key identifier, hex (None if it has none)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier else None


def revoke_certificates(s: Session, kind: SubjectKind, subject_id: str, reason: str) -> None:
    """Revoke every certificate of the subject that is not revoked already."""
    s.exec(
        update(Certificate)
        .where(col(Certificate.subject_kind) == kind)
        .where(col(Certificate.subject_id) == subject_id)
        .where(
            col(Certificate.status).in_(
                [CertStatus.ACTIVE, CertStatus.ON_HOLD, CertStatus.SUPERSEDED]
            )
        )
        .values(status=CertStatus.REVOKED, revoked_at=utcnow(), revocation_reason=reason)
    )
