"""A device's certificate life: first enrollment through a station, renewal by the device itself.

Both run over EST into a :class:`KeyStore`: a new key is generated in the store, the CSR is signed
with it, and the store switches to key and certificate together only once the CA has answered,
so a refused or interrupted request leaves the working identity untouched.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.errors import EnrollmentError
from device_sdk.est import EstClient, EstError, device_csr
from device_sdk.keystore import KeyStore, device_id_of
from device_sdk.tls import trusting_context


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class RenewalPolicy:
    """When a connected client renews its certificate with EST ``simplereenroll``.

    ``fraction`` of the validity must have passed (two thirds: a device that is offline for a
    while still renews well before expiry). ``clock`` is injectable so tests can move time; the
    clock is read every ``check_interval`` seconds. ``drain_timeout`` bounds how long the switch
    to the new certificate waits for in-flight QoS 1 messages to be acknowledged.
    """

    fraction: float = 2 / 3
    check_interval: float = 60.0
    retry_interval: float = 300.0
    drain_timeout: float = 5.0
    clock: Callable[[], dt.datetime] = field(default=_utc_now)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"renewal fraction must be between 0 and 1, not {self.fraction}")


def renewal_due(cert: x509.Certificate, fraction: float) -> dt.datetime:
    """The moment ``fraction`` of the certificate's validity has passed."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def enroll(
    keystore: KeyStore,
    device_id: str,
    *,
    est_url: str,
    station_cert: Path,
    station_key: Path,
    timeout: float = 30.0,
) -> x509.Certificate:
    """First certificate: EST ``simpleenroll`` authenticated by the station's certificate."""
    context = station_context(keystore, station_cert, station_key)
    return _obtain(keystore, device_id, est_url, context, "enroll", timeout)


def station_context(keystore: KeyStore, station_cert: Path, station_key: Path) -> ssl.SSLContext:
    """A client context that trusts the fleet root and presents the station's certificate."""
    context = trusting_context(keystore)
    try:
        context.load_cert_chain(station_cert, station_key)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(
            f"cannot load the station credentials {station_cert} / {station_key}: {exc}"
        ) from exc
    return context


@contextmanager
def est_session(
    est_url: str,
    context: ssl.SSLContext,
    *,
    refused: str,
    trust: Path,
    timeout: float,
) -> Iterator[EstClient]:
    """An EST connection whose failures become :class:`EnrollmentError` saying what to check.

    ``refused`` completes "the EST server at <url> refused to ...", e.g. "enroll sensor-9".
    """
    try:
        with EstClient(est_url, context, timeout=timeout) as est:
            yield est
    except EstError as exc:
        raise EnrollmentError(
            f"the EST server at {est_url} refused to {refused}: {exc.message}"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        raise EnrollmentError(
            f"the EST server at {est_url} did not verify against {trust} "
            f"({exc.verify_message}): that file must hold the fleet root CA, and the URL's host "
            "must be a name in the server's certificate"
        ) from exc
    except ssl.SSLError as exc:
        raise EnrollmentError(
            f"TLS with the EST server at {est_url} failed ({exc.reason or exc}): the server "
            "did not accept the client certificate (the station's, or for a renewal the "
            "device's own)"
        ) from exc
    except OSError as exc:
        raise EnrollmentError(f"cannot reach the EST server at {est_url}: {exc}") from exc


def install_issued(
    keystore: KeyStore,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca_certs: list[x509.Certificate],
    *,
    device_id: str,
) -> None:
    """Install ``cert`` with its intermediates, once it is checked to name ``device_id``."""
    issued_for = device_id_of(cert)
    if issued_for != device_id:
        raise EnrollmentError(
            f"the EST server issued a certificate for {issued_for}, not {device_id}; "
            "nothing was installed"
        )
    keystore.install(key, [cert, *issuers_of(cert, ca_certs)])


def reenroll(
    keystore: KeyStore, device_id: str, *, est_url: str, timeout: float = 30.0
) -> x509.Certificate:
    """Renewal: EST ``simplereenroll`` authenticated by the device's current certificate."""
    context = trusting_context(keystore)
    keystore.load_identity(context)
    return _obtain(keystore, device_id, est_url, context, "reenroll", timeout)


def _obtain(
    keystore: KeyStore,
    device_id: str,
    est_url: str,
    context: ssl.SSLContext,
    operation: str,
    timeout: float,
) -> x509.Certificate:
    key = keystore.new_key()
    csr = device_csr(device_id, key)
    trust = keystore.trust_anchors_path
    with est_session(
        est_url, context, refused=f"{operation} {device_id}", trust=trust, timeout=timeout
    ) as est:
        ca_certs = est.cacerts()
        cert = est.simpleenroll(csr) if operation == "enroll" else est.simplereenroll(csr)
    install_issued(keystore, key, cert, ca_certs, device_id=device_id)
    refresh_trust_anchors(keystore, ca_certs)
    return cert


def issuers_of(leaf: x509.Certificate, ca_certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """The intermediate CAs above ``leaf`` up to a root (roots and the cross certificates of a
    root rotation stay out: the broker has them)."""
    roots = {c.subject for c in ca_certs if c.subject == c.issuer}
    by_subject = {c.subject: c for c in ca_certs if c.subject != c.issuer}
    chain: list[x509.Certificate] = []
    current = leaf
    while current.issuer not in roots and (parent := by_subject.pop(current.issuer, None)):
        chain.append(parent)
        current = parent
    return chain


def refresh_trust_anchors(keystore: KeyStore, ca_certs: list[x509.Certificate]) -> None:
    """Follow a root rotation through EST ``cacerts`` (fetched over TLS verified by the current
    anchors): a new root is adopted only where a cross certificate in the answer shows a trusted
    root certified its key, and a root the server no longer lists is dropped once another is
    trusted. Nothing changes while the answer vouches for no root."""
    setter = getattr(keystore, "set_trust_anchors", None)
    path = keystore.trust_anchors_path
    if setter is None or not path.exists():
        return
    current = x509.load_pem_x509_certificates(path.read_bytes())
    listed = [c for c in ca_certs if c.subject == c.issuer and _signed_by(c, c)]
    crosses = [c for c in ca_certs if c not in listed]  # a root rotation keeps the root's name
    trusted = [c for c in listed if c in current]
    for root in listed:
        if root not in trusted and any(
            cross.subject == root.subject
            and cross.public_key() == root.public_key()
            and any(_signed_by(cross, anchor) for anchor in current)
            for cross in crosses
        ):
            trusted.append(root)
    if trusted and trusted != current:
        setter(trusted)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
