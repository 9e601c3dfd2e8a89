"""Concurrent enrollments over the live HTTPS endpoint: one id is enrolled once, many ids all are.

Every request runs on its own thread and its own TLS connection; a barrier releases them together
once all connections are up, so they reach the server as close to simultaneously as it can be.
"""

from __future__ import annotations

import base64
import http.client
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID

from device_sdk.est import client_context, device_csr
from enrollment.errors import EnrollmentRefused
from enrollment.registry import CertStatus, DeviceState, SubjectKind

EST = "/.well-known/est"


@dataclass(frozen=True)
class Outcome:
    device_id: str
    status: int
    body: bytes

    def certificate(self) -> x509.Certificate:
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(self.body))
        return cert


def enroll_all_at_once(fleet, server, station, device_ids: list[str]) -> list[Outcome]:
    """POST one simpleenroll per entry of ``device_ids``, each on its own connection, together."""
    context = client_context(fleet.root, station.cert, station.key)
    bodies = [
        base64.encodebytes(
            device_csr(d, ec.generate_private_key(ec.SECP256R1())).public_bytes(Encoding.DER)
        )
        for d in device_ids
    ]
    barrier = threading.Barrier(len(device_ids), timeout=20)

    def one(index: int) -> Outcome:
        conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=30)
        try:
            conn.connect()  # handshake first, so only the requests race
            barrier.wait()
            conn.request(
                "POST",
                f"{EST}/simpleenroll",
                body=bodies[index],
                headers={"Content-Type": "application/pkcs10"},
            )
            response = conn.getresponse()
            return Outcome(device_ids[index], response.status, response.read())
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=len(device_ids)) as pool:
        return list(pool.map(one, range(len(device_ids))))


def test_twenty_parallel_enrollments_of_one_id_yield_exactly_one_certificate(fleet, est_server):
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1")

    outcomes = enroll_all_at_once(fleet, est_server, station, ["sensor-1"] * 20)

    winners = [o for o in outcomes if o.status == 200]
    losers = [o for o in outcomes if o.status != 200]
    assert len(winners) == 1, [(o.status, o.body[:120]) for o in outcomes]
    assert len(losers) == 19
    for loser in losers:
        text = loser.body.decode()
        assert loser.status == 409, text
        assert text.startswith("enrollment_refused: device sensor-1 "), text
        assert text.count("\n") == 1  # one line

    cert = winners[0].certificate()
    rows = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert [(r.serial, r.status) for r in rows] == [(f"{cert.serial_number:x}", CertStatus.ACTIVE)]
    assert fleet.registry.device("sensor-1").state == DeviceState.ACTIVE

    events = [e for e in fleet.registry.audit_events(subject="sensor-1") if e.action == "enroll"]
    assert sorted(e.outcome for e in events) == ["ok"] + ["refused"] * 19
    assert all(e.actor == "station:line-1" for e in events)


def test_fifty_parallel_enrollments_of_different_ids_all_succeed(fleet, est_server):
    station = fleet.add_station("line-1")
    ids = [f"unit-{n:03d}" for n in range(50)]
    fleet.batch("line-1", *ids)

    outcomes = enroll_all_at_once(fleet, est_server, station, ids)

    assert [o.status for o in outcomes] == [200] * 50, [
        o.body[:120] for o in outcomes if o.status != 200
    ]
    serials = set()
    for outcome in outcomes:
        cert = outcome.certificate()
        (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert cn.value == outcome.device_id
        (row,) = fleet.registry.certificates_of(SubjectKind.DEVICE, outcome.device_id)
        assert (row.serial, row.status) == (f"{cert.serial_number:x}", CertStatus.ACTIVE)
        serials.add(cert.serial_number)
    assert len(serials) == 50
    assert [d.id for d in fleet.registry.devices(state=DeviceState.ACTIVE)] == ids
    assert fleet.registry.devices(state=DeviceState.PENDING) == []


def test_twenty_threads_racing_inside_the_service_enroll_one_id_once(fleet):
    """The same race without the HTTP server in between: threads pass the early check before
    any of them commits, so the registry's conditional update must stop all but one."""
    _, station_cert = fleet.service.add_station("line-1", actor="test")
    fleet.batch("line-1", "sensor-1")
    bodies = [
        base64.encodebytes(
            device_csr("sensor-1", ec.generate_private_key(ec.SECP256R1())).public_bytes(
                Encoding.DER
            )
        )
        for _ in range(20)
    ]
    barrier = threading.Barrier(20, timeout=20)

    def one(body: bytes) -> x509.Certificate | EnrollmentRefused:
        barrier.wait()
        try:
            return fleet.service.enroll(station_cert, body)
        except EnrollmentRefused as exc:
            return exc

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, bodies))

    issued = [r for r in results if isinstance(r, x509.Certificate)]
    refused = [r for r in results if isinstance(r, EnrollmentRefused)]
    assert (len(issued), len(refused)) == (1, 19)
    assert all(r.http_status == 409 for r in refused)
    rows = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert [(r.serial, r.status) for r in rows] == [
        (f"{issued[0].serial_number:x}", CertStatus.ACTIVE)
    ]
    events = [e for e in fleet.registry.audit_events(subject="sensor-1") if e.action == "enroll"]
    assert sorted(e.outcome for e in events) == ["ok"] + ["refused"] * 19
