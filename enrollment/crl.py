"""Certificate revocation lists (RFC 5280 section 5), built as a pure function of the registry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

from enrollment.profiles import Issuer, hash_for
from enrollment.signing import sign_crl
from fleetgate.errors import FleetgateError

# RFC 5280 section 5.3.1 reason names, as the CLI accepts them.
REASONS: dict[str, x509.ReasonFlags] = {flag.value: flag for flag in x509.ReasonFlags}


class UnknownReason(FleetgateError):
    code = "bad_reason"

    def __init__(self, reason: str) -> None:
        usable = ", ".join(r for r in REASONS if r not in {"removeFromCRL", "certificateHold"})
        super().__init__(f"unknown revocation reason {reason!r}; use one of: {usable}")


def parse_reason(reason: str) -> x509.ReasonFlags:
    try:
        return REASONS[reason]
    except KeyError:
        raise UnknownReason(reason) from None


@dataclass(frozen=True)
class RevokedEntry:
    """One line of a CRL."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags


def build_crl(
    issuer: Issuer,
    entries: Iterable[RevokedEntry],
    *,
    now: dt.datetime,
    next_update: dt.timedelta,
) -> x509.CertificateRevocationList:
    """Sign a CRL listing ``entries``; its number is the issue time in ms, so it only grows."""
    if issuer.certificate is None:
        raise ValueError("a CRL issuer needs its certificate")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not x509.ReasonFlags.unspecified:
            # RFC 5280 5.3.1: the reason code should be absent rather than "unspecified".
            revoked = revoked.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return sign_crl(builder, issuer.key, hash_for(issuer.key))


def needs_refresh(crl_der: bytes, *, now: dt.datetime) -> bool:
    """True once half of the CRL's validity has passed (or it cannot be read).

    The serving process re-signs it then, so relying parties never hold an expired CRL and
    certificates superseded by renewal reach the list within half a CRL period.
    """
    try:
        crl = x509.load_der_x509_crl(crl_der)
    except ValueError:
        return True
    next_update = crl.next_update_utc
    if next_update is None:
        return True
    return now >= crl.last_update_utc + (next_update - crl.last_update_utc) / 2
