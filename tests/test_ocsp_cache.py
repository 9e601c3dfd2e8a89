"""Signed OCSP responses reused per certificate and status until half their validity.

The status is read from the registry on every request, so a revocation made elsewhere (another
service instance here, the CLI in production) is answered at once with a newly signed response.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from device_sdk.est import device_csr
from enrollment.registry import DeviceState
from enrollment.service import EnrollmentService

T0 = dt.datetime(2026, 12, 7, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def device_cert(fleet, est_server) -> x509.Certificate:
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1")
    with est_server.client(fleet.root, station.cert, station.key) as est:
        return est.simpleenroll(device_csr("sensor-1", ec.generate_private_key(ec.SECP256R1())))


def request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def test_responses_are_reused_until_half_validity_and_re_signed_on_a_status_change(
    fleet, device_cert
):
    now = [T0]
    service = EnrollmentService(fleet.service.ca, fleet.registry, clock=lambda: now[0])
    issuer = fleet.service.ca.anchors.issuing
    plain = request(device_cert, issuer)
    validity = dt.timedelta(minutes=fleet.config.ca.ocsp_validity_minutes)

    first = service.ocsp_response(plain)
    now[0] = T0 + validity / 2 - dt.timedelta(seconds=1)
    assert service.ocsp_response(plain) == first  # the same signed bytes

    with_nonce = ocsp.load_der_ocsp_response(
        service.ocsp_response(request(device_cert, issuer, b"n1"))
    )
    assert with_nonce.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n1"
    assert with_nonce.this_update_utc == now[0]  # signed for this request

    now[0] = T0 + validity / 2
    renewed = ocsp.load_der_ocsp_response(service.ocsp_response(plain))
    assert renewed.this_update_utc == now[0]
    assert renewed.certificate_status == ocsp.OCSPCertStatus.GOOD

    fleet.service.change_device("sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    revoked = ocsp.load_der_ocsp_response(service.ocsp_response(plain))
    assert revoked.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert revoked.revocation_reason == x509.ReasonFlags.key_compromise
