"""Concurrent enrollments over the live HTTPS endpoint: one id is enrolled once, many ids all are.

Every request runs on its own thread and its own TLS connection; a barrier releases them together
once all connections are up. On the server, the service calls run on the server's thread pool,
and the first calls are held at the signing stage until as many as the pool runs at once have
arrived (:class:`HoldAtSigning`): by then each has passed the early "is the device still
pending?" check, so for one id only the registry's guard at commit stands between them and a
second certificate. The pool's ``peak_in_flight`` gauge proves the calls did run together.

Each test runs against SQLite (the server forced to four threads; its default is one) and
PostgreSQL (the server's default pool for it).
"""

from __future__ import annotations

import base64
import http.client
import shutil
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RunningServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID
from registry_helpers import new_registry
from test_registry_postgres import pg_server, pg_url  # noqa: F401 (fixtures: a fresh database)

from device_sdk.est import EstClient, client_context, device_csr
from enrollment.registry import CertStatus, DeviceState, SubjectKind
from enrollment.service import StageTimer
from enrollment.workers import ServiceThreads
from firmware_sim.station import new_station
from fleetgate.config import Config, load_config
from fleetgate.errors import EnrollmentRefused

EST = "/.well-known/est"
SQLITE_THREADS = 4  # the server's default for SQLite is one thread: nothing would overlap


@pytest.fixture(params=["sqlite", "postgresql"])
def config(
    request: pytest.FixtureRequest,
    home: Path,
    _ca_template: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Config:
    """The conftest data directory, with its registry in SQLite or in a fresh PostgreSQL
    database (configured as an operator would, through the environment)."""
    if request.param == "postgresql":
        monkeypatch.setenv("FLEETGATE_DATABASE_URL", request.getfixturevalue("pg_url"))
    cfg = load_config(home)
    assert cfg.database_url.startswith(request.param)
    shutil.copytree(_ca_template, cfg.ca_dir)
    new_registry(cfg.database_url).close()
    return cfg


@pytest.fixture
def est_server(fleet, config: Config) -> Iterator[RunningServer]:
    threads = SQLITE_THREADS if config.database_url.startswith("sqlite") else None
    server = RunningServer(config, threads=threads).start()
    assert server.server.threads.threads > 1, "the server would run one request at a time"
    yield server
    server.stop()


class HoldAtSigning(StageTimer):
    """A stage timer that holds callers at the "sign" stage until ``release`` is set: by the
    test, or by the arrival of the ``parties``-th caller (later callers then pass).

    ``met`` says whether the parties all arrived; if they do not within 20 s (the server ran
    requests one at a time), everyone is let through and the test's assertions say so.
    """

    def __init__(self, parties: int | None = None) -> None:
        super().__init__()
        self.parties = parties
        self.arrived = 0
        self.met = False
        self.release = threading.Event()
        self._arrivals = threading.Condition()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name == "sign":
            self._hold()
        with super().stage(name):
            yield

    def _hold(self) -> None:
        with self._arrivals:
            self.arrived += 1
            if self.parties is not None and self.arrived == self.parties:
                self.met = True
                self.release.set()
            self._arrivals.notify_all()
        if not self.release.wait(20):
            self.release.set()

    def wait_for_arrivals(self, count: int) -> bool:
        with self._arrivals:
            return self._arrivals.wait_for(lambda: self.arrived >= count, timeout=20)


def hold_service_calls(server: RunningServer) -> tuple[HoldAtSigning, ServiceThreads]:
    """Make the server's first enrollments meet at signing, as many as its pool runs at once."""
    threads = server.server.threads
    hold = HoldAtSigning(threads.threads)
    server.server.service.timer = hold
    return hold, threads


def assert_overlapped(hold: HoldAtSigning, threads: ServiceThreads) -> None:
    """The server ran ``threads.threads`` enrollments at once: the gauge saw them together."""
    assert hold.met, f"only {hold.arrived} enrollment(s) reached signing together"
    assert threads.peak_in_flight == threads.threads
    assert threads.in_flight == 0


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
    hold, threads = hold_service_calls(est_server)

    outcomes = enroll_all_at_once(fleet, est_server, station, ["sensor-1"] * 20)

    assert_overlapped(hold, threads)
    winners = [o for o in outcomes if o.status == 200]
    losers = [o for o in outcomes if o.status != 200]
    assert len(winners) == 1, [(o.status, o.body[:120]) for o in outcomes]
    assert len(losers) == 19
    for loser in losers:
        text = loser.body.decode()
        assert loser.status == 409, text
        assert text.startswith("enrollment_refused: device sensor-1 "), text
        assert text.count("\n") == 1  # one line
    # The held requests had all passed the early check and signed: the guard at commit, not
    # the early check, refused every one of them but the winner.
    discarded = [o for o in losers if b"was discarded" in o.body]
    assert len(discarded) >= threads.threads - 1, [o.body for o in losers]

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
    hold, threads = hold_service_calls(est_server)

    outcomes = enroll_all_at_once(fleet, est_server, station, ids)

    assert_overlapped(hold, threads)
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
    """The same race without the HTTP server in between: all twenty threads are held at signing
    until every one has passed the early check, so the registry's conditional update must stop
    all but one."""
    _, station_cert = new_station(fleet.service, "line-1", actor="test")
    fleet.batch("line-1", "sensor-1")
    bodies = [
        base64.encodebytes(
            device_csr("sensor-1", ec.generate_private_key(ec.SECP256R1())).public_bytes(
                Encoding.DER
            )
        )
        for _ in range(20)
    ]
    hold = HoldAtSigning(20)
    fleet.service.timer = hold

    def one(body: bytes) -> x509.Certificate | EnrollmentRefused:
        try:
            return fleet.service.enroll(station_cert, body)
        except EnrollmentRefused as exc:
            return exc

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, bodies))

    assert hold.met
    issued = [r for r in results if isinstance(r, x509.Certificate)]
    refused = [r for r in results if isinstance(r, EnrollmentRefused)]
    assert (len(issued), len(refused)) == (1, 19)
    assert all(r.http_status == 409 for r in refused)
    assert all("was discarded" in r.message for r in refused)
    rows = fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert [(r.serial, r.status) for r in rows] == [
        (f"{issued[0].serial_number:x}", CertStatus.ACTIVE)
    ]
    events = [e for e in fleet.registry.audit_events(subject="sensor-1") if e.action == "enroll"]
    assert sorted(e.outcome for e in events) == ["ok"] + ["refused"] * 19


def test_handshakes_are_answered_while_every_service_thread_is_busy(fleet, config):
    """Enrollments held mid-signing fill the server's whole pool (its default size: one thread
    on SQLite); the event loop still completes TLS handshakes, serves cacerts and refuses a
    bad handshake, whose audit entry is stored once the pool is free again."""
    server = RunningServer(config).start()
    try:
        station = fleet.add_station("line-1")
        width = server.server.threads.threads
        ids = [f"sensor-{n}" for n in range(width)]
        fleet.batch("line-1", *ids)
        hold = HoldAtSigning()
        server.server.service.timer = hold
        with ThreadPoolExecutor(max_workers=1) as background:
            pending = background.submit(enroll_all_at_once, fleet, server, station, ids)
            assert hold.wait_for_arrivals(width)
            assert server.server.threads.in_flight == width

            with EstClient(server.url, client_context(fleet.root, None, None), timeout=5) as est:
                assert len(est.cacerts()) == 2
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as probe:
                probe.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a TLS ClientHello
                while probe.recv(4096):  # the alert, then the server's close
                    pass
            assert not pending.done()

            hold.release.set()
            outcomes = pending.result(timeout=30)
        assert [o.status for o in outcomes] == [200] * width
    finally:
        server.stop()  # stores the queued audit entries
    events = [e for e in fleet.registry.audit_events() if e.action == "tls.handshake"]
    assert [(e.outcome, e.actor.startswith("peer:127.0.0.1:")) for e in events] == [
        ("refused", True)
    ]
