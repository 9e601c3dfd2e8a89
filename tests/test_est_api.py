"""EST over real HTTPS on loopback: what a station and a device get when everything is right.

Every test drives the live enrollment server (aiohttp behind fleetgate's TLS gate) with a real
client: the device SDK, ``curl``, httpx or ``http.client``; ``openssl`` checks the results.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import re
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    SignatureAlgorithmOID,
)

from device_sdk.est import EstError, client_context, device_csr
from enrollment.config import load_config
from enrollment.jsonlog import JsonFormatter
from enrollment.registry import CertStatus, DeviceState, SubjectKind

EST = "/.well-known/est"


# -- helpers -----------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_b64(device_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    return base64.encodebytes(device_csr(device_id, key).public_bytes(Encoding.DER))


def pkcs7_certs(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def get(server, path: str, trust: Path) -> Reply:
    """GET without a client certificate, as any EST client may for the public endpoints."""
    conn = http.client.HTTPSConnection(
        "localhost", server.port, context=client_context(trust), timeout=10
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def openssl_verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", *map(str, args)], capture_output=True, text=True, timeout=30
    )


def crl_pem(tmp_path: Path, der: bytes, name: str = "crl.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(x509.load_der_x509_crl(der).public_bytes(Encoding.PEM))
    return path


@pytest.fixture
def station(fleet):
    """Station line-1, allowed to enroll sensor-1 .. sensor-3."""
    creds = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1", "sensor-2", "sensor-3")
    return creds


def enroll(
    fleet, server, station, device_id: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    with server.client(fleet.root, station.cert, station.key) as est:
        return key, est.simpleenroll(device_csr(device_id, key))


# -- public endpoints --------------------------------------------------------------------------


def test_cacerts_is_base64_pkcs7_holding_issuing_and_root_without_client_cert(fleet, est_server):
    response = get(est_server, f"{EST}/cacerts", fleet.root)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/pkcs7-mime"
    assert response.headers["Content-Transfer-Encoding"] == "base64"
    certs = pkcs7_certs(response.body)
    anchors = fleet.service.ca.anchors
    assert {c.fingerprint(hashes.SHA256()) for c in certs} == {
        anchors.issuing.fingerprint(hashes.SHA256()),
        anchors.root.fingerprint(hashes.SHA256()),
    }
    assert len(certs) == 2
    on_disk = x509.load_pem_x509_certificates((fleet.config.ca_dir / "chain.pem").read_bytes())
    assert {c.serial_number for c in certs} == {c.serial_number for c in on_disk}
    # The SDK client reads the same answer.
    with est_server.client(fleet.root) as est:
        assert {c.subject for c in est.cacerts()} == {c.subject for c in certs}


def _asn1(der: bytes, tmp_path: Path) -> list[tuple[int, str, str]]:
    """(depth, kind, value) of each element, as ``openssl asn1parse`` sees them."""
    path = tmp_path / "attrs.der"
    path.write_bytes(der)
    out = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*\d+:d=(\d+)\s+hl=\d+\s+l=\s*\d+\s+(?:prim|cons):\s+(\S+)\s*:?(.*)$", line)
        assert m, line
        rows.append((int(m[1]), m[2], m[3].strip()))
    return rows


def test_csrattrs_asks_for_p256_ecdsa_sha256_and_a_common_name(fleet, est_server, tmp_path):
    response = get(est_server, f"{EST}/csrattrs", fleet.root)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/csrattrs"
    rows = _asn1(base64.b64decode(response.body), tmp_path)
    # CsrAttrs (RFC 7030 4.5.2): a SEQUENCE of OIDs and Attributes {type, SET OF values}.
    assert rows == [
        (0, "SEQUENCE", ""),
        (1, "OBJECT", "ecdsa-with-SHA256"),
        (1, "SEQUENCE", ""),
        (2, "OBJECT", "id-ecPublicKey"),
        (2, "SET", ""),
        (3, "OBJECT", "prime256v1"),  # the only curve a device key may use
        (1, "OBJECT", "commonName"),  # the device id goes in the CN
    ]


# -- simpleenroll ------------------------------------------------------------------------------


def _assert_device_profile(cert, device_id, key, config, issuing) -> None:
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    cert.verify_directly_issued_by(issuing)
    assert cert.issuer == issuing.subject

    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        device_id
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"urn:fleetgate:device:{device_id}")]

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    (point,) = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in point.full_name] == [config.ca.crl_url]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
    ] == [config.ca.ocsp_url]

    # RFC 5280 / CA/B: at least 64 bits of serial entropy, positive.
    assert cert.serial_number > 0
    assert cert.serial_number.bit_length() > 64


def _assert_validity_days(cert: x509.Certificate, days: int) -> None:
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=days))) < dt.timedelta(minutes=2)


def test_station_enrolls_device_with_sdk_and_gets_the_device_profile(fleet, est_server, station):
    key, cert = enroll(fleet, est_server, station, "sensor-1")
    _assert_device_profile(cert, "sensor-1", key, fleet.config, fleet.service.ca.anchors.issuing)
    _assert_validity_days(cert, 90)
    assert fleet.config.ca.crl_url == "https://localhost:8443/crl"  # the default was used

    device = fleet.registry.device("sensor-1")
    assert device.state == DeviceState.ACTIVE
    (row,) = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert row.serial == f"{cert.serial_number:x}"
    assert row.status == CertStatus.ACTIVE
    assert x509.load_pem_x509_certificate(row.pem.encode()) == cert
    (event,) = [e for e in fleet.registry.audit_events(subject="sensor-1") if e.action == "enroll"]
    assert (event.outcome, event.actor) == ("ok", "station:line-1")
    assert f"{cert.serial_number:x}" in event.reason


def test_two_enrollments_get_distinct_random_serials(fleet, est_server, station):
    _, first = enroll(fleet, est_server, station, "sensor-1")
    _, second = enroll(fleet, est_server, station, "sensor-2")
    assert first.serial_number != second.serial_number
    assert second.serial_number.bit_length() > 64


def test_validity_and_revocation_urls_follow_the_configuration(fleet, station, home, monkeypatch):
    monkeypatch.setenv("FLEETGATE_CA_DEVICE_VALIDITY_DAYS", "30")
    monkeypatch.setenv("FLEETGATE_CA_CRL_URL", "http://pki.fleet.test/issuing.crl")
    monkeypatch.setenv("FLEETGATE_CA_OCSP_URL", "http://ocsp.fleet.test/")
    config = load_config(home)
    assert config.ca.device_validity_days == 30
    server = RunningServer(config).start()
    try:
        key, cert = enroll(fleet, server, station, "sensor-1")
    finally:
        server.stop()
    _assert_validity_days(cert, 30)
    _assert_device_profile(cert, "sensor-1", key, config, fleet.service.ca.anchors.issuing)


def test_station_enrolls_device_with_curl(fleet, est_server, station, tmp_path):
    key = new_key()
    body = tmp_path / "csr.b64"
    body.write_bytes(csr_b64("sensor-2", key))
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--cacert",
            str(fleet.root),
            "--cert",
            str(station.cert),
            "--key",
            str(station.key),
            "--data-binary",
            f"@{body}",
            "-H",
            "Content-Type: application/pkcs10",
            f"{est_server.url}{EST}/simpleenroll",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    (cert,) = pkcs7_certs(result.stdout)
    _assert_device_profile(cert, "sensor-2", key, fleet.config, fleet.service.ca.anchors.issuing)
    assert fleet.registry.device("sensor-2").state == DeviceState.ACTIVE


def test_station_enrolls_device_with_httpx(fleet, est_server, station):
    key = new_key()
    ctx = ssl.create_default_context(cafile=str(fleet.root))
    ctx.load_cert_chain(station.cert, station.key)
    with httpx.Client(base_url=est_server.url, verify=ctx, timeout=10) as client:
        response = client.post(
            f"{EST}/simpleenroll",
            content=csr_b64("sensor-3", key),
            headers={"Content-Type": "application/pkcs10", "X-Request-ID": "httpx-test-1"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/pkcs7-mime")
    assert "smime-type=certs-only" in response.headers["content-type"]
    assert response.headers["x-request-id"] == "httpx-test-1"
    (cert,) = pkcs7_certs(response.content)
    _assert_device_profile(cert, "sensor-3", key, fleet.config, fleet.service.ca.anchors.issuing)
    (event,) = [e for e in fleet.registry.audit_events(subject="sensor-3") if e.action == "enroll"]
    assert event.request_id == "httpx-test-1"


class JsonLines(logging.Handler):
    """Formats each record as it is emitted, while the request's log context is current."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_log_lines_carry_the_request_id_and_the_device_id_the_service_found(
    fleet, est_server, station
):
    """The service runs on a worker thread; the device id it reads from the CSR still reaches
    the EST layer's log lines of that request, refused or not."""
    handler = JsonLines()
    logger = logging.getLogger("fleetgate.est")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    ctx = ssl.create_default_context(cafile=str(fleet.root))
    ctx.load_cert_chain(station.cert, station.key)
    try:
        with httpx.Client(base_url=est_server.url, verify=ctx, timeout=10) as client:
            for device_id, rid in (("sensor-2", "log-ok"), ("sensor-9", "log-refused")):
                client.post(
                    f"{EST}/simpleenroll",
                    content=csr_b64(device_id, new_key()),
                    headers={"Content-Type": "application/pkcs10", "X-Request-ID": rid},
                )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(x["msg"].split(":")[0], x["request_id"], x["device_id"]) for x in handler.lines] == [
        ("enroll ok", "log-ok", "sensor-2"),
        ("enroll refused", "log-refused", "sensor-9"),
    ]


def test_enrolled_certificate_verifies_with_openssl_for_client_auth(fleet, est_server, station):
    key, cert = enroll(fleet, est_server, station, "sensor-1")
    cert_path, _ = fleet.write_device("sensor-1", key, cert)
    result = openssl_verify("-purpose", "sslclient", "-CAfile", fleet.chain, cert_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{cert_path}: OK" in result.stdout
    # ...but not for a server, which the profile does not allow.
    result = openssl_verify("-purpose", "sslserver", "-CAfile", fleet.chain, cert_path)
    assert result.returncode != 0


# -- revocation --------------------------------------------------------------------------------


def _crl_from_server(fleet, server) -> bytes:
    response = get(server, "/crl", fleet.root)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/pkix-crl"
    return response.body


def _listed(crl_der: bytes, serial: int, issuing) -> x509.RevokedCertificate | None:
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(issuing.public_key())
    return crl.get_revoked_certificate_by_serial_number(serial)


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags:
    return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason


def test_revoked_device_is_in_the_crl_and_openssl_refuses_it(fleet, est_server, station, tmp_path):
    key, cert = enroll(fleet, est_server, station, "sensor-1")
    cert_path, _ = fleet.write_device("sensor-1", key, cert)
    issuing = fleet.service.ca.anchors.issuing

    before = _crl_from_server(fleet, est_server)
    assert _listed(before, cert.serial_number, issuing) is None
    clean = crl_pem(tmp_path, before, "before.pem")
    ok = openssl_verify("-crl_check", "-CRLfile", clean, "-CAfile", fleet.chain, cert_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    fleet.service.change_device(
        "sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="test"
    )

    served = _crl_from_server(fleet, est_server)
    on_disk = (fleet.config.ca_dir / "crl.der").read_bytes()
    assert served == on_disk
    entry = _listed(served, cert.serial_number, issuing)
    assert entry is not None
    assert _reason(entry) == x509.ReasonFlags.key_compromise
    (row,) = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "keyCompromise")

    revoked = crl_pem(tmp_path, served, "after.pem")
    result = openssl_verify("-crl_check", "-CRLfile", revoked, "-CAfile", fleet.chain, cert_path)
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr


def test_suspended_device_is_on_hold_in_the_crl_until_reinstated(
    fleet, est_server, station, tmp_path
):
    key, cert = enroll(fleet, est_server, station, "sensor-1")
    cert_path, _ = fleet.write_device("sensor-1", key, cert)
    issuing = fleet.service.ca.anchors.issuing

    fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="lost", actor="test")
    held = _crl_from_server(fleet, est_server)
    entry = _listed(held, cert.serial_number, issuing)
    assert entry is not None
    assert _reason(entry) == x509.ReasonFlags.certificate_hold
    result = openssl_verify(
        "-crl_check",
        "-CRLfile",
        crl_pem(tmp_path, held, "held.pem"),
        "-CAfile",
        fleet.chain,
        cert_path,
    )
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr

    fleet.service.change_device("sensor-1", DeviceState.ACTIVE, reason="found", actor="test")
    cleared = _crl_from_server(fleet, est_server)
    assert _listed(cleared, cert.serial_number, issuing) is None
    assert cleared == (fleet.config.ca_dir / "crl.der").read_bytes()
    result = openssl_verify(
        "-crl_check",
        "-CRLfile",
        crl_pem(tmp_path, cleared, "cleared.pem"),
        "-CAfile",
        fleet.chain,
        cert_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert row.status == CertStatus.ACTIVE


# -- simplereenroll ----------------------------------------------------------------------------


def test_device_reenrolls_with_its_current_cert_and_a_new_key(fleet, est_server, station):
    old_key, old_cert = enroll(fleet, est_server, station, "sensor-1")
    old_path, old_key_path = fleet.write_device("sensor-1", old_key, old_cert)

    new_key_ = new_key()
    with est_server.client(fleet.root, old_path, old_key_path) as est:
        new_cert = est.simplereenroll(device_csr("sensor-1", new_key_))
    _assert_device_profile(
        new_cert, "sensor-1", new_key_, fleet.config, fleet.service.ca.anchors.issuing
    )
    assert new_cert.serial_number != old_cert.serial_number

    rows = {
        r.serial: r.status for r in fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    }
    assert rows == {
        f"{old_cert.serial_number:x}": CertStatus.SUPERSEDED,
        f"{new_cert.serial_number:x}": CertStatus.ACTIVE,
    }
    assert fleet.registry.device("sensor-1").state == DeviceState.ACTIVE
    (event,) = [
        e for e in fleet.registry.audit_events(subject="sensor-1") if e.action == "reenroll"
    ]
    assert (event.outcome, event.actor) == ("ok", "device:sensor-1")


def test_superseded_certificate_can_no_longer_reenroll(fleet, est_server, station):
    old_key, old_cert = enroll(fleet, est_server, station, "sensor-1")
    old_path, old_key_path = fleet.write_device("sensor-1", old_key, old_cert)
    with est_server.client(fleet.root, old_path, old_key_path) as est:
        current = est.simplereenroll(device_csr("sensor-1", new_key()))

    with (
        est_server.client(fleet.root, old_path, old_key_path) as est,
        pytest.raises(EstError) as refused,
    ):
        est.simplereenroll(device_csr("sensor-1", new_key()))
    assert refused.value.status == 403
    assert f"certificate {old_cert.serial_number:x} is superseded" in refused.value.message

    rows = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert [r.serial for r in rows if r.status == CertStatus.ACTIVE] == [
        f"{current.serial_number:x}"
    ]
    assert len(rows) == 2
