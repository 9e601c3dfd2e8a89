"""The OCSP responder (RFC 6960) on the enrollment service, checked with `openssl ocsp`.

Answers come from the registry as it is at the moment of the request, so a revoke or suspend
shows in the very next response, with no CRL regeneration in between.
"""

from __future__ import annotations

import base64
import datetime as dt
import ssl
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from device_sdk.est import device_csr
from enrollment import profiles
from enrollment.crl import needs_refresh
from enrollment.profiles import Issuer, Subject
from enrollment.registry import DeviceState


@pytest.fixture
def enrolled(fleet, est_server, tmp_path):
    """A device enrolled over EST; returns (certificate, its PEM path)."""
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1")
    with est_server.client(fleet.root, station.cert, station.key) as est:
        cert = est.simpleenroll(device_csr("sensor-1", ec.generate_private_key(ec.SECP256R1())))
    path = tmp_path / "sensor-1.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, path


def openssl_ocsp(fleet, est_server, cert_path: Path) -> str:
    result = subprocess.run(
        [
            "openssl", "ocsp",
            "-issuer", str(fleet.config.ca_dir / "issuing.crt"),
            "-cert", str(cert_path),
            "-url", f"{est_server.url}/ocsp",
            "-CAfile", str(fleet.chain),
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Response verify OK" in result.stderr
    return result.stdout


def ocsp_get(est_server, fleet, request_der: bytes) -> ocsp.OCSPResponse:
    path = urllib.parse.quote(base64.b64encode(request_der).decode(), safe="")
    context = ssl.create_default_context(cafile=str(fleet.root))
    with urllib.request.urlopen(f"{est_server.url}/ocsp/{path}", context=context) as response:
        assert response.headers["Content-Type"] == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(response.read())


def request_for(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256())
    builder = builder.add_extension(x509.OCSPNonce(b"fleetgate-nonce-1"), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def test_an_active_device_certificate_is_good_and_the_response_verifies(
    fleet, est_server, enrolled
):
    _, path = enrolled
    out = openssl_ocsp(fleet, est_server, path)
    assert f"{path}: good" in out


def test_revocation_shows_in_the_next_ocsp_answer(fleet, est_server, enrolled):
    _, path = enrolled
    fleet.service.change_device("sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    out = openssl_ocsp(fleet, est_server, path)
    assert f"{path}: revoked" in out
    assert "Reason: keyCompromise" in out


def test_suspension_answers_revoked_on_hold_and_reinstatement_good_again(
    fleet, est_server, enrolled
):
    _, path = enrolled
    fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="t", actor="t")
    out = openssl_ocsp(fleet, est_server, path)
    assert f"{path}: revoked" in out
    assert "Reason: certificateHold" in out
    fleet.service.change_device("sensor-1", DeviceState.ACTIVE, reason="t", actor="t")
    assert f"{path}: good" in openssl_ocsp(fleet, est_server, path)


def test_get_form_echoes_the_nonce_and_is_signed_by_the_issuing_ca(fleet, est_server, enrolled):
    cert, _ = enrolled
    issuing = fleet.service.ca.anchors.issuing
    response = ocsp_get(est_server, fleet, request_for(cert, issuing))
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == cert.serial_number
    nonce = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    assert nonce == b"fleetgate-nonce-1"
    issuing.public_key().verify(
        response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256())
    )
    assert response.next_update_utc - response.this_update_utc == dt.timedelta(minutes=60)


def test_a_serial_never_issued_here_is_unknown(fleet, est_server, enrolled):
    issuing = fleet.service.ca.anchors.issuing
    stranger = profiles.build_certificate(
        profiles.DEVICE,
        subject=Subject(common_name="ghost"),
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        issuer=fleet.service.ca.issuer,
        validity=dt.timedelta(days=1),
        now=dt.datetime.now(dt.UTC),
    )
    response = ocsp_get(est_server, fleet, request_for(stranger, issuing))
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


def test_a_request_about_another_ca_is_unauthorized(fleet, est_server, enrolled):
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    foreign_root = profiles.build_certificate(
        profiles.ROOT,
        subject=Subject(common_name="elsewhere"),
        public_key=foreign_key.public_key(),
        issuer=Issuer(key=foreign_key, certificate=None),
        validity=dt.timedelta(days=1),
        now=dt.datetime.now(dt.UTC),
    )
    cert, _ = enrolled
    response = ocsp_get(est_server, fleet, request_for(cert, foreign_root))
    assert response.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_garbage_is_a_malformed_request(fleet, est_server):
    response = ocsp_get(est_server, fleet, b"not an OCSP request")
    assert response.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_a_renewed_certificate_is_revoked_as_superseded_in_ocsp_and_the_crl(
    fleet, est_server, enrolled
):
    """Renewal withdraws the old certificate: OCSP says so at once, the next CRL lists it."""
    old_cert, old_path = enrolled
    # The service is transport-free: renew as the device whose certificate this is.
    new_key = ec.generate_private_key(ec.SECP256R1())
    body = base64.b64encode(
        device_csr("sensor-1", new_key).public_bytes(serialization.Encoding.DER)
    )
    fleet.service.reenroll(old_cert, body)
    out = openssl_ocsp(fleet, est_server, old_path)
    assert f"{old_path}: revoked" in out
    assert "Reason: superseded" in out
    crl = x509.load_der_x509_crl(
        fleet.service.publish_crl().public_bytes(serialization.Encoding.DER)
    )
    entry = crl.get_revoked_certificate_by_serial_number(old_cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.superseded


def test_the_served_crl_is_re_signed_once_half_its_validity_has_passed(fleet):
    """A running service never hands out a CRL that is about to lapse."""
    crl = fleet.service.publish_crl()
    der = crl.public_bytes(serialization.Encoding.DER)
    half = (crl.next_update_utc - crl.last_update_utc) / 2
    assert not needs_refresh(der, now=crl.last_update_utc + half - dt.timedelta(seconds=1))
    assert needs_refresh(der, now=crl.last_update_utc + half)
    assert needs_refresh(b"not a crl", now=crl.last_update_utc)
