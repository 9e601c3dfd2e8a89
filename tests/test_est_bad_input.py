"""Every way an EST request can be wrong, against the live HTTPS endpoint.

Each refusal must (1) answer with the right HTTP status and one line a person can act on,
(2) leave an audit entry with outcome ``refused`` and that reason, and (3) change nothing else in
the registry: the device stays pending and no certificate row appears.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from registry_helpers import new_registry
from sqlmodel import select

from device_sdk.est import client_context, device_csr
from enrollment.ca import init_ca, load_ca
from enrollment.registry import AuditEvent, Certificate, DeviceState, Registry
from enrollment.server import EnrollmentServer
from enrollment.service import EnrollmentService
from firmware_sim.station import new_station
from fleetgate.config import load_config
from fleetgate.errors import CAPassphraseError
from fleetgate.keyfiles import write_certificates, write_private_key

EST = "/.well-known/est"


# -- helpers -----------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    common_name: str,
    key=None,
    *,
    san: list[str] | None = None,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> x509.CertificateSigningRequest:
    """A CSR with CN ``common_name`` (not validated, so bad ids fit) and the given extensions."""
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in san]),
            critical=False,
        )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=isinstance(ext, x509.BasicConstraints))
    return builder.sign(key, hashes.SHA256())


def b64(csr: x509.CertificateSigningRequest | bytes) -> bytes:
    der = csr if isinstance(csr, bytes) else csr.public_bytes(Encoding.DER)
    return base64.encodebytes(der)


@dataclass(frozen=True)
class Reply:
    status: int
    text: str


def post(
    server, operation: str, body: bytes, trust: Path, cert: Path | None = None, key=None
) -> Reply:
    """One POST on its own connection, whatever the body."""
    conn = http.client.HTTPSConnection(
        "localhost", server.port, context=client_context(trust, cert, key), timeout=10
    )
    try:
        conn.request(
            "POST", f"{EST}/{operation}", body=body, headers={"Content-Type": "application/pkcs10"}
        )
        response = conn.getresponse()
        return Reply(response.status, response.read().decode())
    finally:
        conn.close()


@dataclass(frozen=True)
class Snapshot:
    devices: list[tuple[str, str, str | None]]
    certificates: list[tuple[str, str, str, str]]
    last_audit_id: int


def snapshot(registry: Registry) -> Snapshot:
    with registry.transaction() as s:
        certs = sorted(
            (c.serial, c.subject_kind, c.subject_id, c.status)
            for c in s.exec(select(Certificate)).all()
        )
    devices = [(d.id, d.state, d.station_id) for d in registry.devices()]
    events = registry.audit_events(limit=1)
    return Snapshot(devices, certs, (events[-1].id or 0) if events else 0)


def new_audit_events(registry: Registry, since: int, *, wait_for: int = 0) -> list[AuditEvent]:
    """Audit entries after id ``since``; waits up to 5 s for ``wait_for`` of them to appear."""
    deadline = time.monotonic() + 5
    while True:
        events = [e for e in registry.audit_events(limit=500) if (e.id or 0) > since]
        if len(events) >= wait_for or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def assert_refused(
    fleet,
    before: Snapshot,
    reply: Reply,
    *,
    status: int,
    action: str,
    says: str,
    actor: str,
    subject: str | None = None,
) -> AuditEvent:
    """Refused with ``status`` and one actionable line, audited, and nothing else changed."""
    assert reply.status == status, reply.text
    line = reply.text.rstrip("\n")
    assert line and "\n" not in line, f"not one line: {reply.text!r}"
    assert says in line, line
    (event,) = new_audit_events(fleet.registry, before.last_audit_id)
    assert (event.action, event.outcome) == (action, "refused")
    assert event.reason == line  # the operator reads in the audit what the client was told
    assert re.fullmatch(actor, event.actor), event.actor  # who tried, as TLS verified it
    assert event.subject == subject
    after = snapshot(fleet.registry)
    assert (after.devices, after.certificates) == (before.devices, before.certificates)
    return event


def assert_tls_refused(fleet, before: Snapshot, *, reason_has: str) -> AuditEvent:
    """The TLS gate refused the handshake: audited as tls.handshake, registry unchanged."""
    events = new_audit_events(fleet.registry, before.last_audit_id, wait_for=1)
    assert [(e.action, e.outcome) for e in events] == [("tls.handshake", "refused")], events
    (event,) = events
    assert event.actor.startswith("peer:127.0.0.1:")
    assert reason_has in event.reason, event.reason
    after = snapshot(fleet.registry)
    assert (after.devices, after.certificates) == (before.devices, before.certificates)
    return event


@pytest.fixture
def station(fleet):
    """Station line-1 may enroll sensor-1 and sensor-2; both are pending."""
    creds = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1", "sensor-2")
    return creds


@dataclass(frozen=True)
class EnrolledDevice:
    id: str
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


@pytest.fixture
def enrolled(fleet, est_server, station) -> EnrolledDevice:
    """sensor-1, enrolled over EST; its key and certificate on disk."""
    key = new_key()
    with est_server.client(fleet.root, station.cert, station.key) as est:
        cert = est.simpleenroll(device_csr("sensor-1", key))
    cert_path, key_path = fleet.write_device("sensor-1", key, cert)
    return EnrolledDevice("sensor-1", cert, cert_path, key_path)


def enroll_body(fleet, est_server, station, body: bytes) -> tuple[Snapshot, Reply]:
    before = snapshot(fleet.registry)
    return before, post(est_server, "simpleenroll", body, fleet.root, station.cert, station.key)


# -- the request body --------------------------------------------------------------------------


def _tampered_signature() -> bytes:
    der = bytearray(
        make_csr("sensor-1", san=["urn:fleetgate:device:sensor-1"]).public_bytes(Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s value
    return bytes(der)


BAD_BODIES: dict[str, tuple[Callable[[], bytes], str]] = {
    "not_base64": (lambda: b"this is not base64 at all!\n", "the request body is not base64"),
    "base64_of_garbage": (
        lambda: base64.encodebytes(b"\x30\x03garbage that is not DER" * 4),
        "the body is not a DER PKCS#10 certificate signing request",
    ),
    "pem_garbage": (
        lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "the PEM body is not a valid PKCS#10 CSR",
    ),
    "empty": (lambda: b"", "the request body is empty"),
    "bad_self_signature": (
        lambda: b64(_tampered_signature()),
        "the CSR's signature does not verify",
    ),
    "rsa_1024_key": (
        lambda: b64(
            make_csr("sensor-1", rsa.generate_private_key(public_exponent=65537, key_size=1024))
        ),
        "the CSR holds an RSA-1024 key: device keys must be ECDSA P-256",
    ),
    "p384_key": (
        lambda: b64(make_csr("sensor-1", ec.generate_private_key(ec.SECP384R1()))),
        "the CSR's key is on curve secp384r1: device keys must be P-256",
    ),
    "requests_ca_true": (
        lambda: b64(
            make_csr(
                "sensor-1",
                san=["urn:fleetgate:device:sensor-1"],
                extensions=(x509.BasicConstraints(ca=True, path_length=None),),
            )
        ),
        "the CSR requests extension 2.5.29.19 (basicConstraints): "
        "devices may request only a subjectAltName; the CA sets the rest",
    ),
    "requests_key_usage": (
        lambda: b64(
            make_csr(
                "sensor-1",
                extensions=(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),),
            )
        ),
        "the CSR requests extension 2.5.29.37 (extendedKeyUsage): "
        "devices may request only a subjectAltName",
    ),
    "san_for_another_device": (
        lambda: b64(make_csr("sensor-1", san=["urn:fleetgate:device:sensor-2"])),
        "the CSR's subjectAltName must be exactly the URI urn:fleetgate:device:sensor-1",
    ),
    "san_with_an_extra_name": (
        lambda: b64(
            make_csr(
                "sensor-1",
                san=["urn:fleetgate:device:sensor-1", "urn:fleetgate:station:line-1"],
            )
        ),
        "the CSR's subjectAltName must be exactly the URI urn:fleetgate:device:sensor-1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_csr_is_refused_with_400_and_nothing_is_issued(fleet, est_server, station, case):
    make_body, says = BAD_BODIES[case]
    before, reply = enroll_body(fleet, est_server, station, make_body())
    assert_refused(
        fleet,
        before,
        reply,
        status=400,
        action="enroll",
        says=f"bad_csr: {says}",
        actor="station:line-1",
    )
    assert fleet.registry.device("sensor-1").state == DeviceState.PENDING


@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")  # the 65-char CN
@pytest.mark.parametrize(
    "device_id",
    ["a+b", "a/b", "x#", "$SYS", "d" * 65, "with space", "..", "nul\x00byte"],
    ids=["plus", "slash", "hash", "dollar-SYS", "65-chars", "space", "dot-dot", "nul"],
)
def test_device_id_that_fails_validation_is_refused(fleet, est_server, station, device_id):
    before, reply = enroll_body(fleet, est_server, station, b64(make_csr(device_id)))
    event = assert_refused(
        fleet,
        before,
        reply,
        status=400,
        action="enroll",
        says="bad_csr: the CSR subject CN is not a valid device id",
        actor="station:line-1",
    )
    assert "use 1-64 characters from A-Z a-z 0-9 . _ -" in event.reason


def test_device_id_outside_the_stations_batches_is_refused(fleet, est_server, station):
    before, reply = enroll_body(fleet, est_server, station, b64(device_csr("sensor-9", new_key())))
    assert_refused(
        fleet,
        before,
        reply,
        status=409,
        action="enroll",
        subject="sensor-9",
        says="device sensor-9 is not in any batch of station line-1: "
        "add it with `fleetgate batch add line-1 sensor-9`",
        actor="station:line-1",
    )


def test_device_id_in_another_stations_batch_is_refused(fleet, est_server, station):
    fleet.add_station("line-2")
    fleet.batch("line-2", "other-1")
    before, reply = enroll_body(fleet, est_server, station, b64(device_csr("other-1", new_key())))
    assert_refused(
        fleet,
        before,
        reply,
        status=409,
        action="enroll",
        subject="other-1",
        says="device other-1 is not in any batch of station line-1",
        actor="station:line-1",
    )
    assert fleet.registry.device("other-1").state == DeviceState.PENDING


def test_second_enrollment_of_an_enrolled_id_is_refused(fleet, est_server, station, enrolled):
    before, reply = enroll_body(fleet, est_server, station, b64(device_csr("sensor-1", new_key())))
    assert_refused(
        fleet,
        before,
        reply,
        status=409,
        action="enroll",
        subject="sensor-1",
        says="device sensor-1 is already enrolled (state active); "
        "an enrolled device renews with simplereenroll",
        actor="station:line-1",
    )


# -- who is asking -----------------------------------------------------------------------------


def test_enrollment_without_a_client_certificate_is_refused(fleet, est_server, station):
    before = snapshot(fleet.registry)
    reply = post(est_server, "simpleenroll", b64(device_csr("sensor-1", new_key())), fleet.root)
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="enroll",
        actor="anonymous",
        says="this request needs a station client certificate (mutual TLS)",
    )
    assert fleet.registry.device("sensor-1").state == DeviceState.PENDING


def test_device_certificate_cannot_enroll_other_devices(fleet, est_server, station, enrolled):
    before = snapshot(fleet.registry)
    body = b64(device_csr("sensor-2", new_key()))
    reply = post(
        est_server, "simpleenroll", body, fleet.root, enrolled.cert_path, enrolled.key_path
    )
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="enroll",
        actor="device:sensor-1",
        says="a device certificate (sensor-1) cannot be used here; "
        "this request needs a station certificate",
    )
    assert fleet.registry.device("sensor-2").state == DeviceState.PENDING


def test_station_certificate_cannot_reenroll_a_device(fleet, est_server, station, enrolled):
    """A station renews only itself at simplereenroll (tests/test_station_bootstrap.py)."""
    before = snapshot(fleet.registry)
    body = b64(device_csr("sensor-1", new_key()))
    reply = post(est_server, "simplereenroll", body, fleet.root, station.cert, station.key)
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="reenroll",
        actor="station:line-1",
        says="a station's CSR must name the station (line-1)",
    )


@pytest.fixture
def foreign_station(tmp_path, home):
    """A station certificate named line-1 but issued by another fleetgate CA."""
    other = load_config(tmp_path / "other-fleet")
    init_ca(other)
    registry = new_registry(other.database_url)
    try:
        service = EnrollmentService(load_ca(other), registry)
        key, cert = new_station(service, "line-1", actor="test")
    finally:
        registry.close()
    directory = tmp_path / "foreign"
    write_private_key(directory / "station.key", key)
    write_certificates(directory / "station.crt", [cert, service.ca.anchors.issuing])
    return directory / "station.crt", directory / "station.key"


def test_station_certificate_from_another_ca_is_refused_at_the_tls_handshake(
    fleet, est_server, station, foreign_station
):
    cert, key = foreign_station
    before = snapshot(fleet.registry)
    with est_server.client(fleet.root, cert, key) as est, pytest.raises(ssl.SSLError) as refused:
        est.simpleenroll(device_csr("sensor-1", new_key()))
    # The client is told why (TLS alert), not just that the connection went away.
    assert "unknown ca" in str(refused.value).lower()
    assert_tls_refused(fleet, before, reason_has="client certificate rejected: unable to get")
    assert fleet.registry.device("sensor-1").state == DeviceState.PENDING


def test_revoked_station_cannot_enroll(fleet, est_server, station):
    fleet.service.revoke_station("line-1", reason="keyCompromise", actor="test")
    before, reply = enroll_body(fleet, est_server, station, b64(device_csr("sensor-1", new_key())))
    event = assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="enroll",
        actor="station:line-1",
        says="is revoked (keyCompromise on ",
    )
    assert "ask an operator for a new station certificate" in event.reason
    assert fleet.registry.device("sensor-1").state == DeviceState.PENDING


# -- simplereenroll ----------------------------------------------------------------------------


def reenroll_body(fleet, est_server, device: EnrolledDevice, body: bytes) -> tuple[Snapshot, Reply]:
    before = snapshot(fleet.registry)
    reply = post(est_server, "simplereenroll", body, fleet.root, device.cert_path, device.key_path)
    return before, reply


def test_revoked_device_cannot_reenroll(fleet, est_server, enrolled):
    fleet.service.change_device(
        "sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="test"
    )
    before, reply = reenroll_body(
        fleet, est_server, enrolled, b64(device_csr("sensor-1", new_key()))
    )
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="reenroll",
        actor="device:sensor-1",
        subject="sensor-1",
        says=f"device:sensor-1: certificate {enrolled.cert.serial_number:x} is revoked "
        "(keyCompromise on ",
    )


def test_suspended_device_cannot_reenroll(fleet, est_server, enrolled):
    fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="lost", actor="test")
    before, reply = reenroll_body(
        fleet, est_server, enrolled, b64(device_csr("sensor-1", new_key()))
    )
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="reenroll",
        actor="device:sensor-1",
        subject="sensor-1",
        says="is on_hold (certificateHold on ",
    )


def test_device_cannot_reenroll_for_another_device_id(fleet, est_server, enrolled):
    before, reply = reenroll_body(
        fleet, est_server, enrolled, b64(device_csr("sensor-2", new_key()))
    )
    assert_refused(
        fleet,
        before,
        reply,
        status=403,
        action="reenroll",
        actor="device:sensor-1",
        subject="sensor-1",
        says="device sensor-1 may renew only its own certificate, not one for sensor-2",
    )
    assert fleet.registry.device("sensor-2").state == DeviceState.PENDING


def test_reenrollment_with_a_bad_csr_is_refused(fleet, est_server, enrolled):
    p384 = make_csr(
        "sensor-1", ec.generate_private_key(ec.SECP384R1()), san=["urn:fleetgate:device:sensor-1"]
    )
    before, reply = reenroll_body(fleet, est_server, enrolled, b64(p384))
    assert_refused(
        fleet,
        before,
        reply,
        status=400,
        action="reenroll",
        actor="device:sensor-1",
        subject="sensor-1",
        says="bad_csr: the CSR's key is on curve secp384r1",
    )


@pytest.fixture
def expired_device(fleet, station) -> EnrolledDevice:
    """sensor-2, enrolled 200 days ago by a station of that time: its 90-day cert has expired."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=200)
    then = EnrollmentService(fleet.service.ca, fleet.registry, clock=lambda: past)
    _, old_station = new_station(then, "line-old", actor="test")
    fleet.batch("line-old", "old-1")
    key = new_key()
    cert = then.enroll(old_station, b64(device_csr("old-1", key)))
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    cert_path, key_path = fleet.write_device("old-1", key, cert)
    assert fleet.registry.device("old-1").state == DeviceState.ACTIVE
    return EnrolledDevice("old-1", cert, cert_path, key_path)


def test_expired_device_certificate_is_refused_at_the_tls_handshake(
    fleet, est_server, expired_device
):
    before = snapshot(fleet.registry)
    with (
        est_server.client(fleet.root, expired_device.cert_path, expired_device.key_path) as est,
        pytest.raises(ssl.SSLError) as refused,
    ):
        est.simplereenroll(device_csr("old-1", new_key()))
    assert "certificate expired" in str(refused.value).lower()
    event = assert_tls_refused(fleet, before, reason_has="expired")
    assert event.reason == "client certificate rejected: certificate has expired"


# -- transport ---------------------------------------------------------------------------------


def test_plain_http_on_the_tls_port_is_refused_and_audited(fleet, est_server):
    before = snapshot(fleet.registry)
    with socket.create_connection(("127.0.0.1", est_server.port), timeout=5) as raw:
        raw.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(100) == b""  # OpenSSL sends no alert here; the server hangs up cleanly
    assert_tls_refused(fleet, before, reason_has="TLS handshake failed: http request")


def test_client_that_never_completes_the_handshake_is_dropped_and_audited(fleet, home, monkeypatch):
    monkeypatch.setenv("FLEETGATE_ENROLLMENT_TLS_HANDSHAKE_TIMEOUT_S", "0.3")
    server = RunningServer(load_config(home)).start()
    try:
        before = snapshot(fleet.registry)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            assert raw.recv(100) == b""  # closed by the server after the timeout
        assert_tls_refused(fleet, before, reason_has="TLS handshake")
    finally:
        server.stop()


# -- transport limits --------------------------------------------------------------------------


def test_oversized_body_is_refused_with_413(fleet, est_server, station):
    limit = fleet.config.enrollment.max_body_bytes
    body = base64.encodebytes(b"\x00" * limit)  # well over the limit once base64-encoded
    assert len(body) > limit
    before, reply = enroll_body(fleet, est_server, station, body)
    event = assert_refused(
        fleet,
        before,
        reply,
        status=413,
        action="enroll",
        says=f"body_too_large: the request body exceeds {limit} bytes",
        actor=r"peer:127\.0\.0\.1:\d+",
    )
    assert "a P-256 CSR is under 1 KiB" in event.reason
    assert fleet.registry.device("sensor-1").state == DeviceState.PENDING


# -- the CA passphrase -------------------------------------------------------------------------


def test_wrong_ca_passphrase_is_refused_naming_the_variable(config, monkeypatch):
    monkeypatch.setenv("FLEETGATE_CA_PASSPHRASE", "not-the-passphrase")
    with pytest.raises(CAPassphraseError) as wrong:
        load_ca(config)
    assert "FLEETGATE_CA_PASSPHRASE" in wrong.value.message
    assert "does not decrypt" in wrong.value.message
    assert wrong.value.code == "ca_passphrase"
    # The server refuses to start on it rather than serving with a locked CA.
    with pytest.raises(CAPassphraseError):
        EnrollmentServer(config, port=0)


def test_missing_ca_passphrase_is_refused_naming_the_variable(config, monkeypatch):
    monkeypatch.delenv("FLEETGATE_CA_PASSPHRASE")
    with pytest.raises(CAPassphraseError) as missing:
        load_ca(config)
    assert "set FLEETGATE_CA_PASSPHRASE" in missing.value.message
