"""The fleet's CA certificates and their rotation state, and which devices each CA still serves.

The registry is where every process learns of a rotation: the CLI records a new CA here (after
writing its key), the enrollment service switches to the active issuing CA, and brokers trust
every CA that is not retired (``enrollment.authorities``), without a restart.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.certificates import issuer_key_id
from enrollment.registry.models import (
    AuthorityRole,
    AuthorityState,
    CertAuthority,
    Certificate,
    CertStatus,
    Device,
    DeviceState,
    SubjectKind,
    utcnow,
)
from fleetgate.errors import NotFound

CUT_OFF_REASON = "cessationOfOperation"
"""The revocation reason of a certificate whose issuing CA was retired before it was renewed."""


@dataclass(frozen=True)
class AuthorityRecord:
    """One CA certificate and its state, as every process reads it."""

    certificate: x509.Certificate
    key_id: str
    role: AuthorityRole
    state: AuthorityState
    issuer_key_id: str | None

    @property
    def retired(self) -> bool:
        return self.state == AuthorityState.RETIRED


def authority_key_id(cert: x509.Certificate) -> str:
    """A CA certificate's own key identifier (RFC 5280 4.2.1.2 method 1), hex."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


_Row = TypeVar("_Row")


def _of_active_devices(query: SelectOfScalar[_Row]) -> SelectOfScalar[_Row]:
    """``query`` limited to the active certificates of active devices."""
    return (
        query.join(Device, col(Device.id) == col(Certificate.subject_id))
        .where(col(Certificate.subject_kind) == SubjectKind.DEVICE)
        .where(col(Certificate.status) == CertStatus.ACTIVE)
        .where(col(Device.state) == DeviceState.ACTIVE)
    )


class Authorities(AuditLog):
    """CA rows: recorded by ``ca init`` and ``ca rotate``, retired by ``ca retire``."""

    def authorities(self, *, include_retired: bool = True) -> list[AuthorityRecord]:
        """Every CA certificate, oldest first."""
        with self._read_session() as s:
            query = select(CertAuthority).order_by(col(CertAuthority.created_at))
            if not include_retired:
                query = query.where(CertAuthority.state != AuthorityState.RETIRED.value)
            rows = s.exec(query).all()
        return [
            AuthorityRecord(
                x509.load_pem_x509_certificate(r.pem.encode()),
                r.key_id,
                AuthorityRole(r.role),
                AuthorityState(r.state),
                r.issuer_key_id,
            )
            for r in rows
        ]

    def record_authorities(
        self,
        added: Sequence[tuple[x509.Certificate, AuthorityRole, AuthorityState]],
        *,
        demote: Sequence[str] = (),
        audit: AuditRecord,
    ) -> None:
        """Add CA certificates and move the CAs with key ids in ``demote`` from active to
        trusted, with the audit entry, in one transaction."""
        with self.transaction() as s:
            if demote:
                s.exec(
                    update(CertAuthority)
                    .where(col(CertAuthority.key_id).in_(list(demote)))
                    .where(col(CertAuthority.state) == AuthorityState.ACTIVE.value)
                    .values(state=AuthorityState.TRUSTED.value)
                )
            for cert, role, state in added:
                s.add(
                    CertAuthority(
                        fingerprint_sha256=_fingerprint(cert),
                        key_id=authority_key_id(cert),
                        role=role.value,
                        state=state.value,
                        subject=cert.subject.rfc4514_string(),
                        issuer_key_id=issuer_key_id(cert),
                        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                        not_after=cert.not_valid_after_utc,
                    )
                )
            self.audit(audit, s)

    def active_devices_by_issuer(self) -> Counter[str | None]:
        """How many active devices hold an active certificate from each CA (by key id)."""
        with self._read_session() as s:
            issuer = col(Certificate.issuer_key_id)  # a column: select() then types one scalar
            rows = s.exec(_of_active_devices(select(issuer))).all()
        return Counter(rows)

    def holders_on(self, key_ids: Sequence[str]) -> list[str]:
        """Active devices and stations ("device:<id>", "station:<id>") whose active certificate
        one of these CAs issued, sorted."""
        with self._read_session() as s:
            devices = s.exec(
                _of_active_devices(select(Certificate.subject_id)).where(
                    col(Certificate.issuer_key_id).in_(list(key_ids))
                )
            ).all()
            stations = s.exec(
                select(Certificate.subject_id)
                .where(col(Certificate.subject_kind) == SubjectKind.STATION)
                .where(col(Certificate.status) == CertStatus.ACTIVE)
                .where(col(Certificate.issuer_key_id).in_(list(key_ids)))
            ).all()
        return sorted([f"device:{d}" for d in devices] + [f"station:{d}" for d in stations])

    def retire_authorities(
        self,
        certificates: Sequence[x509.Certificate],
        *,
        issuers: Sequence[str],
        audit: AuditRecord,
    ) -> list[str]:
        """Retire these CA certificates, and revoke the certificates the CAs with key ids in
        ``issuers`` issued that are still active or on hold (reason cessationOfOperation);
        returns whose they were. One transaction with the audit entry."""
        fingerprints = [_fingerprint(c) for c in certificates]
        now = utcnow()
        with self.transaction() as s:
            found = s.exec(
                select(CertAuthority).where(col(CertAuthority.fingerprint_sha256).in_(fingerprints))
            ).all()
            if len(found) != len(set(fingerprints)):
                raise NotFound("a CA to retire is not in the registry: see `fleetgate ca status`")
            holders: list[str] = []
            current = select(Certificate).where(
                col(Certificate.issuer_key_id).in_(list(issuers)),
                col(Certificate.status).in_([CertStatus.ACTIVE, CertStatus.ON_HOLD]),
            )
            for row in s.exec(current).all():
                holders.append(f"{row.subject_kind}:{row.subject_id}")
                row.status = CertStatus.REVOKED
                row.revoked_at = now
                row.revocation_reason = CUT_OFF_REASON
                s.add(row)
            for authority in found:
                authority.state = AuthorityState.RETIRED.value
                authority.retired_at = now
                s.add(authority)
            self.audit(audit, s)
        return sorted(holders)

    def authority(self, key_id_prefix: str) -> AuthorityRecord:
        """The CA whose key id starts with ``key_id_prefix`` (hex); unambiguous or refused."""
        prefix = key_id_prefix.lower().replace(":", "")
        matches = {
            r.key_id: r for r in self.authorities() if r.key_id.startswith(prefix) and prefix
        }
        if len(matches) != 1:
            raise NotFound(
                f"{len(matches)} CAs have a key id starting with {key_id_prefix!r}: "
                "give more of the key id shown by `fleetgate ca status`"
            )
        rows = [r for r in self.authorities() if r.key_id in matches]
        # A root's own certificate rather than a cross certificate of its key.
        return next((r for r in rows if r.role != AuthorityRole.CROSS), rows[0])
