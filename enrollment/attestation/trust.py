"""Chains from hardware evidence to a manufacturer trust store (TPM EK CAs, card attestation CAs).

Built by hand rather than with ``cryptography.x509.verification``: EK and card attestation
certificates are not WebPKI certificates (EK certificates have an empty subject, a critical
directoryName SAN and TCG extensions the WebPKI verifier rejects). What is checked: issuer-name
chaining, each signature, each validity period, and that every issuer is a CA; then
:func:`check_revocation` looks each manufacturer-issued certificate of the path up in the
manufacturers' CRLs the operator keeps beside their CAs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment.csr import X509_PARSE_ERRORS
from fleetgate.errors import AttestationRefused, ConfigError

MAX_CHAIN_LENGTH = 5
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class CrlPolicy(StrEnum):
    """``[attestation] hardware_crl``: what a manufacturer CRL missing (or stale) means."""

    REQUIRE = "require"  # every manufacturer-issued certificate needs its issuer's fresh CRL
    IF_PRESENT = "if-present"  # a CRL the store holds must be fresh; none: noted in the audit
    IGNORE = "ignore"  # no revocation check at all


def load_trust_store(directory: Path) -> list[x509.Certificate]:
    """Every certificate in the ``*.pem`` files of ``directory``; empty if it does not exist.

    A ``.pem`` file may hold CRLs instead of (or beside) certificates: see :func:`load_crls`.
    """
    if not directory.exists():
        return []
    anchors: list[x509.Certificate] = []
    for path in sorted(directory.glob("*.pem")):
        text = path.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in text and _PEM_CRL.search(text):
            continue
        try:
            anchors.extend(x509.load_pem_x509_certificates(text))
        except ValueError as exc:
            raise ConfigError(f"trust store file {path} holds no valid PEM certificate") from exc
    return anchors


def load_crls(directory: Path) -> list[x509.CertificateRevocationList]:
    """The manufacturers' CRLs of a trust store: ``*.crl`` files (DER or PEM, as published)
    and PEM CRL blocks in its ``*.pem`` files. Which CA issued each is settled by signature
    when it is used (:func:`check_revocation`), not by file name."""
    if not directory.exists():
        return []
    crls: list[x509.CertificateRevocationList] = []
    for path in sorted([*directory.glob("*.crl"), *directory.glob("*.pem")]):
        text = path.read_bytes()
        try:
            if path.suffix == ".crl" and not text.lstrip().startswith(b"-----BEGIN"):
                crls.append(x509.load_der_x509_crl(text))
            else:
                crls.extend(x509.load_pem_x509_crl(m.group()) for m in _PEM_CRL.finditer(text))
        except ValueError as exc:
            raise ConfigError(f"trust store file {path} holds a CRL that cannot be read") from exc
        if path.suffix == ".crl" and not crls:
            raise ConfigError(f"trust store file {path} holds no CRL")
    return crls


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


def check_revocation(
    path: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    *,
    policy: CrlPolicy,
    now: dt.datetime,
    what: str,
    first: int = 0,
) -> str:
    """Look ``path[first:-1]`` up in its issuers' CRLs; a line for the audit trail, or refuse.

    ``path`` is :func:`verify_chain`'s (leaf .. anchor), so each certificate's issuer is the
    next one. A CRL counts for an issuer only if its signature verifies with that issuer's key
    (test and real manufacturers reuse CA names). ``first`` skips certificates no manufacturer
    issues (a card signs its slot attestations itself: nobody publishes a CRL for those).
    """
    if policy is CrlPolicy.IGNORE:
        return "revocation not checked (hardware_crl = ignore)"
    unchecked: list[str] = []
    for index in range(first, len(path) - 1):
        cert, issuer = path[index], path[index + 1]
        label = what if index == first else "issuer certificate"
        crl = _newest_crl(issuer, cert, crls)
        if crl is None:
            if policy is CrlPolicy.REQUIRE:
                raise AttestationRefused(
                    f"no CRL of {describe(issuer)} is in the trust store, and hardware_crl = "
                    f'"require": the {label} ({describe(cert)}) cannot be checked for '
                    "revocation; put the manufacturer's current CRL"
                    f"{_where(cert)} beside its CA"
                )
            unchecked.append(describe(issuer))
            continue
        _check_fresh(crl, issuer, cert, now=now)
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            raise AttestationRefused(
                f"the {label} ({describe(cert)}, serial {cert.serial_number:x}) is revoked by "
                f"{describe(issuer)} since {entry.revocation_date_utc:%Y-%m-%d}"
                f"{_reason(entry)}: this hardware is no longer trusted by its manufacturer"
            )
    if unchecked:
        return f"no CRL in the trust store for {', '.join(unchecked)} (hardware_crl = if-present)"
    return "not revoked per the manufacturers' CRLs"


def _newest_crl(
    issuer: x509.Certificate,
    cert: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
) -> x509.CertificateRevocationList | None:
    """The latest (by thisUpdate) of ``issuer``'s full CRLs that cover ``cert``."""
    own = [
        crl
        for crl in crls
        if crl.issuer == issuer.subject
        and _covers(crl, cert)
        and _signed_by(crl, issuer.public_key())
    ]
    return max(own, key=lambda crl: crl.last_update_utc, default=None)


def _covers(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    """Whether ``crl`` could list ``cert``: not a delta CRL, and not a partitioned one (RFC
    5280 5.2.5) whose scope leaves ``cert`` out. Such a CRL's silence says nothing."""
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        return False
    except x509.ExtensionNotFound:
        pass
    try:
        scope = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return True
    if scope.only_some_reasons or scope.indirect_crl or scope.only_contains_attribute_certs:
        return False
    return not (
        (scope.only_contains_ca_certs and not _is_ca(cert))
        or (scope.only_contains_user_certs and _is_ca(cert))
    )


def _signed_by(crl: x509.CertificateRevocationList, key: PublicKeyTypes) -> bool:
    try:
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _check_fresh(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    cert: x509.Certificate,
    *,
    now: dt.datetime,
) -> None:
    """A stale CRL (past nextUpdate) might miss a recent revocation: refused, under both
    checking policies, since the operator chose to keep this CRL."""
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        since = (
            "has no nextUpdate" if next_update is None else f"expired {next_update:%Y-%m-%d %H:%M}Z"
        )
        raise AttestationRefused(
            f"the CRL of {describe(issuer)} in the trust store is stale ({since}): fetch the "
            f"manufacturer's current CRL{_where(cert)} (without one, hardware_crl = "
            '"if-present" accepts this hardware unchecked)'
        )
    if now < crl.last_update_utc:
        raise AttestationRefused(
            f"the CRL of {describe(issuer)} is not valid until "
            f"{crl.last_update_utc:%Y-%m-%d %H:%M}Z; check the enrollment server's clock"
        )


def _where(cert: x509.Certificate) -> str:
    """`` (from <url>)`` if the certificate names its CRL distribution point."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ""
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return f" (from {name.value})"
    return ""


def _reason(entry: x509.RevokedCertificate) -> str:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return ""
    return f" ({reason.value})"
