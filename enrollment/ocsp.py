"""An OCSP responder (RFC 6960), as a pure function of a request and the registry's answer.

The issuing CA signs the responses itself (RFC 6960 section 4.2.2.2 allows the CA as responder),
so relying parties need no extra trust anchor. While a rotation overlaps two issuing CAs, each
answers for its own certificates: the request's issuer name and key hashes pick the CA, and a
serial that CA did not issue is ``unknown``. A certificate is ``good`` while active,
``revoked`` once revoked, on hold (reason certificateHold) or renewed (reason superseded: the
broker and EST refuse it too), ``unknown`` if never issued here.

Signing is most of a response's cost, so a request without a nonce gets a response signed
earlier for the same certificate and status (:class:`ResponseCache`) until half its validity has
passed. The status is still read from the registry on every request, so a revocation by any
process (the CLI included) is answered at once with a newly signed response. A request with a
nonce is signed for itself: the nonce is echoed inside the signature.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from enrollment.profiles import Issuer, hash_for
from enrollment.signing import sign_ocsp


@dataclass(frozen=True)
class CertificateStatus:
    """What the registry knows of one serial."""

    revoked: bool
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None
    issuer_key_id: str | None = None  # hex SubjectKeyIdentifier of the CA that issued it


StatusLookup = Callable[[int], CertificateStatus | None]


class ResponseCache:
    """Signed responses by (serial, hash algorithm), each with the status it states and the
    moment it must be re-signed; at most ``size`` of them, the least recently used dropped."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._lock = threading.Lock()  # the service threads answer OCSP concurrently
        self._entries: OrderedDict[
            tuple[str, int, str], tuple[CertificateStatus | None, dt.datetime, bytes]
        ] = OrderedDict()

    def get(
        self, key: tuple[str, int, str], status: CertificateStatus | None, now: dt.datetime
    ) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != status or now >= entry[1]:
                return None
            self._entries.move_to_end(key)
            return entry[2]

    def put(
        self,
        key: tuple[str, int, str],
        status: CertificateStatus | None,
        stale_at: dt.datetime,
        der: bytes,
    ) -> None:
        with self._lock:
            self._entries[key] = (status, stale_at, der)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


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


def key_id(certificate: x509.Certificate) -> str:
    """A CA's key identifier (RFC 5280 4.2.1.2 method 1), hex: what its certificates' AKI say."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest.hex()


def respond(
    request_der: bytes,
    *,
    issuers: Sequence[Issuer],
    lookup: StatusLookup,
    now: dt.datetime,
    validity: dt.timedelta,
    cache: ResponseCache | None = None,
) -> bytes:
    """A DER OCSPResponse for ``request_der``, signed by the one of ``issuers`` it names;
    malformed requests, or requests about another CA, get an error status."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
    except ValueError:
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    asked = (request.issuer_name_hash, request.issuer_key_hash)
    for issuer in issuers:
        if issuer.certificate is None:
            raise ValueError("the OCSP responder needs the issuing CA certificates")
        name_hash, key_hash = _issuer_hashes(issuer.certificate, request.hash_algorithm)
        if asked == (name_hash, key_hash):
            break
    else:
        return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    issuer_id = key_id(issuer.certificate)
    status = lookup(request.serial_number)
    if status is not None and status.issuer_key_id not in (None, issuer_id):
        status = None  # a serial of the other CA: this one never issued it
    nonces = [e.value for e in request.extensions if isinstance(e.value, x509.OCSPNonce)]
    key = (issuer_id, request.serial_number, request.hash_algorithm.name)
    if cache is not None and not nonces:
        cached = cache.get(key, status, now)
        if cached is not None:
            return cached
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
    for nonce in nonces:  # echo the nonce: the client's replay defence
        builder = builder.add_extension(nonce, critical=False)
    der = sign_ocsp(builder, issuer.certificate, issuer.key, hash_for(issuer.key))
    if cache is not None and not nonces:
        cache.put(key, status, now + validity / 2, der)
    return der


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )
