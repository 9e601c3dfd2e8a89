"""An OCSP responder (RFC 6960), as a pure function of a request and the registry's answer.

The issuing CA signs the responses itself (RFC 6960 section 4.2.2.2 allows the CA as responder),
so relying parties need no extra trust anchor. A certificate is ``good`` while active,
``revoked`` once revoked, on hold (reason certificateHold) or renewed (reason superseded: the
broker and EST refuse it too), ``unknown`` if never issued here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from enrollment.profiles import Issuer


@dataclass(frozen=True)
class CertificateStatus:
    """What the registry knows of one serial."""

    revoked: bool
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


StatusLookup = Callable[[int], CertificateStatus | None]


def _issuer_hashes(
    issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) as RFC 6960 section 4.1.1 defines them."""
    name = hashes.Hash(algorithm)
    name.update(issuer.subject.public_bytes())
    key_bits = issuer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = hashes.Hash(algorithm)
    key.update(key_bits)
    return name.finalize(), key.finalize()


def respond(
    request_der: bytes,
    *,
    issuer: Issuer,
    lookup: StatusLookup,
    now: dt.datetime,
    validity: dt.timedelta,
) -> bytes:
    """A DER OCSPResponse for ``request_der``; malformed or foreign requests get an error status."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
    except ValueError:
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    if issuer.certificate is None:
        raise ValueError("the OCSP responder needs the issuing CA certificate")
    name_hash, key_hash = _issuer_hashes(issuer.certificate, request.hash_algorithm)
    if (request.issuer_name_hash, request.issuer_key_hash) != (name_hash, key_hash):
        return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    status = lookup(request.serial_number)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=name_hash,
        issuer_key_hash=key_hash,
        serial_number=request.serial_number,
        algorithm=request.hash_algorithm,
        cert_status=(
            ocsp.OCSPCertStatus.UNKNOWN
            if status is None
            else ocsp.OCSPCertStatus.REVOKED
            if status.revoked
            else ocsp.OCSPCertStatus.GOOD
        ),
        this_update=now,
        next_update=now + validity,
        revocation_time=(status.revoked_at or now) if status and status.revoked else None,
        revocation_reason=status.reason if status and status.revoked else None,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.certificate)
    for ext in request.extensions:
        if isinstance(ext.value, x509.OCSPNonce):  # echo the nonce: the client's replay defence
            builder = builder.add_extension(ext.value, critical=False)
    response = builder.sign(issuer.key, hashes.SHA256())
    return response.public_bytes(serialization.Encoding.DER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
