"""The registry's promises, proven against a real PostgreSQL server (tests/postgres_server.py).

fleetgate says "SQLite by default, PostgreSQL supported". These tests start a throwaway
PostgreSQL cluster once per session, give every test a fresh database, and run the registry and
the enrollment service against it: schema and the append-only audit trigger, all-or-nothing
batches, enrollment end to end, one winner among concurrent enrollments, revocation into the CRL,
and timezone-aware timestamps. If the server binaries are missing the tests fail (never skip) and
say to run `make test`, which installs them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from postgres_server import PostgresServer, server_for_tests
from registry_helpers import new_registry
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, select

from device_sdk.est import device_csr
from enrollment.ca import init_ca, load_ca
from enrollment.registry import (
    AuditEvent,
    AuditRecord,
    Certificate,
    CertStatus,
    Device,
    DeviceState,
    Registry,
    StationState,
    SubjectKind,
)
from enrollment.registry.certificates import certificate_values
from enrollment.registry.models import BatchEntry
from enrollment.service import EnrollmentService
from firmware_sim.station import new_station
from fleetgate.config import load_config
from fleetgate.errors import EnrollmentRefused, NotAuthorised, NotFound

PASSPHRASE = "pg-test-passphrase-0123"
_database_names = itertools.count(1)


def _certificate_row(cert, kind, subject_id):
    return Certificate(**certificate_values(cert, kind, subject_id))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole session."""
    yield from server_for_tests()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_database(f"fleetgate_{next(_database_names)}")


@pytest.fixture
def registry(pg_url: str) -> Iterator[Registry]:
    reg = new_registry(pg_url)
    yield reg
    reg.close()


@dataclass
class PgFleet:
    """A data directory with a CA whose registry lives in PostgreSQL, and one station."""

    service: EnrollmentService
    registry: Registry
    station_cert: x509.Certificate

    def batch(self, *device_ids: str) -> None:
        self.registry.add_batch("line-1", list(device_ids), group="g", label="t", actor="test")

    def enroll(self, device_id: str) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        return self.service.enroll(self.station_cert, csr_body(device_id, key))


def csr_body(device_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The EST simpleenroll body: the device's DER CSR, base64-encoded."""
    return base64.b64encode(device_csr(device_id, key).public_bytes(Encoding.DER))


@pytest.fixture
def pg_fleet(home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PgFleet]:
    """Configured as an operator would: the database URL comes from the environment."""
    monkeypatch.setenv("FLEETGATE_CA_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", pg_url)
    config = load_config(home)
    assert config.database_url == pg_url
    init_ca(config)
    reg = new_registry(config.database_url)
    assert reg.engine.dialect.name == "postgresql"
    service = EnrollmentService(load_ca(config), reg)
    _key, station_cert = new_station(service, "line-1", actor="test")
    yield PgFleet(service, reg, station_cert)
    reg.close()


def audit_of(reg: Registry, subject: str) -> list[tuple[str, str]]:
    return [(e.action, e.outcome) for e in reg.audit_events(subject=subject, limit=1000)]


# -- schema ------------------------------------------------------------------------------------


def test_schema_enum_types_and_partial_index_are_created(registry: Registry) -> None:
    inspector = inspect(registry.engine)
    assert {"device", "certificate", "station", "batch", "batchentry", "auditevent"} <= set(
        inspector.get_table_names()
    )
    with registry.engine.connect() as conn:
        enums = set(conn.execute(text("SELECT typname FROM pg_type WHERE typtype = 'e'")).scalars())
        indexdef = conn.execute(
            text(
                "SELECT indexdef FROM pg_indexes "
                "WHERE indexname = 'one_active_certificate_per_subject'"
            )
        ).scalar_one()
    assert {"devicestate", "certstatus", "subjectkind", "stationstate"} <= enums
    assert "UNIQUE" in indexdef and "WHERE" in indexdef


def test_audit_log_is_append_only(registry: Registry, pg_url: str) -> None:
    registry.audit(AuditRecord("admin:test", "probe", "ok", subject="x", reason="first"))
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.execute(text("UPDATE auditevent SET reason = 'rewritten'"))
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.execute(text("DELETE FROM auditevent"))
    # Opening the registry again changes nothing in the schema; the trigger still holds.
    again = Registry(pg_url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), again.engine.begin() as conn:
            conn.execute(text("DELETE FROM auditevent WHERE subject = 'x'"))
        assert [e.reason for e in again.audit_events(subject="x")] == ["first"]
    finally:
        again.close()


def test_partial_index_allows_one_active_certificate_per_subject(registry: Registry) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first, second, third = (_self_signed(key, serial) for serial in (0xA1, 0xA2, 0xA3))
    with registry.transaction() as s:
        s.add(_certificate_row(first, SubjectKind.DEVICE, "dev-1"))
    with pytest.raises(IntegrityError), registry.transaction() as s:
        s.add(_certificate_row(second, SubjectKind.DEVICE, "dev-1"))
    with registry.transaction() as s:  # a superseded one beside it is fine
        row = _certificate_row(second, SubjectKind.DEVICE, "dev-1")
        row.status = CertStatus.SUPERSEDED
        s.add(row)
        s.add(_certificate_row(third, SubjectKind.DEVICE, "dev-2"))  # another subject too
    statuses = sorted(c.status for c in registry.certificates_of(SubjectKind.DEVICE, "dev-1"))
    assert statuses == [CertStatus.ACTIVE, CertStatus.SUPERSEDED]


def test_partial_index_also_holds_on_sqlite(tmp_path: Path) -> None:
    """The same index predicate must match what SQLite stores (the enum's member names)."""
    reg = new_registry(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        test_partial_index_allows_one_active_certificate_per_subject(reg)
    finally:
        reg.close()


# -- batches -----------------------------------------------------------------------------------


def test_add_batch_is_all_or_nothing(pg_fleet: PgFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = pg_fleet.registry
    pg_fleet.batch("dev-1", "dev-2")
    batches_before = _count(reg, "batch")

    with pytest.raises(EnrollmentRefused, match="dev-2"):  # one id already taken
        pg_fleet.batch("dev-3", "dev-2", "dev-4")
    with pytest.raises(EnrollmentRefused, match="twice"):
        pg_fleet.batch("dev-5", "dev-5")
    with pytest.raises(NotFound):
        reg.add_batch("no-such-station", ["dev-6"], group="g", label="t", actor="test")

    # A failure after the rows were flushed to PostgreSQL rolls all of them back.
    def failing_audit(record: AuditRecord, session: object = None) -> None:
        raise RuntimeError("audit write failed")

    monkeypatch.setattr(reg, "audit", failing_audit)
    with pytest.raises(RuntimeError, match="audit write failed"):
        pg_fleet.batch("dev-7", "dev-8")
    monkeypatch.undo()

    assert [d.id for d in reg.devices()] == ["dev-1", "dev-2"]
    assert _count(reg, "batch") == batches_before
    assert _count(reg, "batchentry") == 2
    pg_fleet.batch("dev-7", "dev-8")  # the ids were not consumed by the failed attempts
    assert [d.id for d in reg.devices()] == ["dev-1", "dev-2", "dev-7", "dev-8"]


# -- enrollment --------------------------------------------------------------------------------


def test_enroll_and_reenroll_through_the_service(pg_fleet: PgFleet) -> None:
    reg = pg_fleet.registry
    pg_fleet.batch("sensor-1")
    cert = pg_fleet.enroll("sensor-1")

    assert reg.device("sensor-1").state == DeviceState.ACTIVE
    (row,) = reg.certificates_of(SubjectKind.DEVICE, "sensor-1")
    assert row.serial == f"{cert.serial_number:x}"
    assert row.status == CertStatus.ACTIVE
    assert x509.load_pem_x509_certificate(row.pem.encode()) == cert
    with reg.transaction() as s:
        entry = s.get(BatchEntry, "sensor-1")
        assert entry is not None and entry.enrolled_at is not None

    with pytest.raises(EnrollmentRefused, match="already enrolled"):
        pg_fleet.enroll("sensor-1")

    # simplereenroll swaps the active certificate (the partial index sees one active at a time).
    renewed = pg_fleet.service.reenroll(
        cert, csr_body("sensor-1", ec.generate_private_key(ec.SECP256R1()))
    )
    statuses = {c.serial: c.status for c in reg.certificates_of(SubjectKind.DEVICE, "sensor-1")}
    assert statuses == {
        f"{cert.serial_number:x}": CertStatus.SUPERSEDED,
        f"{renewed.serial_number:x}": CertStatus.ACTIVE,
    }
    assert audit_of(reg, "sensor-1") == [
        ("enroll", "ok"),
        ("enroll", "refused"),
        ("reenroll", "ok"),
    ]


def test_concurrent_enrollments_of_one_device_have_exactly_one_winner(pg_fleet: PgFleet) -> None:
    reg = pg_fleet.registry
    pg_fleet.batch("racer-1")
    n = 16
    bodies = [csr_body("racer-1", ec.generate_private_key(ec.SECP256R1())) for _ in range(n)]
    start = threading.Barrier(n)
    issued: list[x509.Certificate] = []
    refused: list[EnrollmentRefused] = []
    other: list[BaseException] = []
    lock = threading.Lock()

    def attempt(body: bytes) -> None:
        start.wait(timeout=10)
        try:
            cert = pg_fleet.service.enroll(pg_fleet.station_cert, body)
        except EnrollmentRefused as exc:
            with lock:
                refused.append(exc)
        except BaseException as exc:
            with lock:
                other.append(exc)
        else:
            with lock:
                issued.append(cert)

    threads = [threading.Thread(target=attempt, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert other == []
    assert (len(issued), len(refused)) == (1, n - 1)
    (row,) = reg.certificates_of(SubjectKind.DEVICE, "racer-1")
    assert row.serial == f"{issued[0].serial_number:x}" and row.status == CertStatus.ACTIVE
    assert reg.device("racer-1").state == DeviceState.ACTIVE
    outcomes = sorted(outcome for action, outcome in audit_of(reg, "racer-1"))
    assert outcomes == ["ok"] + ["refused"] * (n - 1)


# -- revocation --------------------------------------------------------------------------------


def test_suspend_reinstate_and_revoke_reach_the_crl(pg_fleet: PgFleet) -> None:
    reg, service = pg_fleet.registry, pg_fleet.service
    pg_fleet.batch("sensor-9")
    cert = pg_fleet.enroll("sensor-9")
    serial = f"{cert.serial_number:x}"

    _, crl = service.change_device("sensor-9", DeviceState.SUSPENDED, reason="", actor="test")
    assert [(s, r) for s, _, r in reg.crl_entries()] == [(serial, "certificateHold")]
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    _, crl = service.change_device("sensor-9", DeviceState.ACTIVE, reason="", actor="test")
    assert reg.crl_entries() == []
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None

    before = dt.datetime.now(dt.UTC)
    _, crl = service.change_device(
        "sensor-9", DeviceState.REVOKED, reason="keyCompromise", actor="test"
    )
    ((listed, revoked_at, reason),) = reg.crl_entries()
    assert (listed, reason) == (serial, "keyCompromise")
    assert revoked_at.tzinfo is not None and before <= revoked_at <= dt.datetime.now(dt.UTC)
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert reg.device("sensor-9").state == DeviceState.REVOKED
    (row,) = reg.certificates_of(SubjectKind.DEVICE, "sensor-9")
    assert row.status == CertStatus.REVOKED


def test_revoked_station_is_listed_and_can_no_longer_enroll(pg_fleet: PgFleet) -> None:
    reg, service = pg_fleet.registry, pg_fleet.service
    pg_fleet.batch("sensor-5")
    crl = service.revoke_station("line-1", reason="cessationOfOperation", actor="test")
    serial = pg_fleet.station_cert.serial_number
    assert [(s, r) for s, _, r in reg.crl_entries()] == [(f"{serial:x}", "cessationOfOperation")]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert reg.station("line-1").state == StationState.REVOKED
    with pytest.raises(NotAuthorised, match="cessationOfOperation"):
        pg_fleet.enroll("sensor-5")
    assert reg.device("sensor-5").state == DeviceState.PENDING


# -- timestamps --------------------------------------------------------------------------------


def test_timestamps_come_back_timezone_aware_and_equal(pg_fleet: PgFleet) -> None:
    reg = pg_fleet.registry
    written = dt.datetime(2031, 5, 17, 8, 9, 10, 123456, tzinfo=dt.UTC)
    elsewhere = dt.datetime(
        2031, 5, 17, 13, 39, 10, 654321, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
    )
    with reg.transaction() as s:
        s.add(Device(id="clock-1", created_at=written, updated_at=elsewhere))
    device = reg.device("clock-1")
    for value, expected in ((device.created_at, written), (device.updated_at, elsewhere)):
        assert value.tzinfo is not None and value.utcoffset() is not None
        assert value == expected

    pg_fleet.batch("clock-2")
    cert = pg_fleet.enroll("clock-2")
    (row,) = reg.certificates_of(SubjectKind.DEVICE, "clock-2")
    assert row.not_before.tzinfo is not None and row.not_after.tzinfo is not None
    assert row.not_before == cert.not_valid_before_utc
    assert row.not_after == cert.not_valid_after_utc
    with reg.transaction() as s:
        events = s.exec(select(AuditEvent).where(AuditEvent.subject == "clock-2")).all()
        certs = s.exec(select(Certificate).where(Certificate.subject_id == "clock-2")).all()
    assert events and all(e.at.tzinfo is not None for e in events)
    assert [c.not_before for c in certs] == [cert.not_valid_before_utc]


# -- helpers -----------------------------------------------------------------------------------


def _count(reg: Registry, table: str) -> int:
    with reg.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def _self_signed(key: ec.EllipticCurvePrivateKey, serial: int) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"probe-{serial:x}")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_the_revocation_feed_sees_a_change_that_commits_after_a_later_id(
    registry: Registry,
) -> None:
    """PostgreSQL hands out ids before commit: id N can become visible after id N+1 did. A
    broker's feed must still report it (else that device's live session would never be kicked)."""
    from broker.feed import RevocationFeed
    from broker.metrics import Metrics
    from enrollment.registry import DeviceChange

    seen: list[str] = []

    async def scenario() -> None:
        feed = RevocationFeed(
            registry, Metrics(), interval=0.01, on_change=lambda c: seen.append(c.device_id)
        )
        await feed.start()
        task = asyncio.create_task(feed.run())
        with Session(registry.engine) as slow:  # takes the lower id, commits last
            slow.add(DeviceChange(device_id="slow", state=DeviceState.REVOKED))
            slow.flush()
            with Session(registry.engine) as fast:
                fast.add(DeviceChange(device_id="fast", state=DeviceState.REVOKED))
                fast.commit()
            for _ in range(200):
                if "fast" in seen:
                    break
                await asyncio.sleep(0.01)
            slow.commit()
        for _ in range(200):
            if "slow" in seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert seen == ["fast", "slow"]


# -- schema migrations -------------------------------------------------------------------------

MAIN_POSTGRESQL = Path(__file__).parent / "fixtures" / "registry_main_postgresql.sql"


def _database(url: str) -> str:
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    assert name is not None
    return name


def _run_sql(server: PostgresServer, database: str, script: str, user: str = "postgres") -> None:
    """Run a multi-statement script (no parameters: psycopg sends it as one simple query)."""
    import psycopg

    conninfo = f"host={server.host} port={server.port} user={user} dbname={database}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        conn.execute(script)  # type: ignore[arg-type]


def _schema_dump(server: PostgresServer, database: str) -> list[str]:
    """pg_dump's schema of ``database`` without Alembic's table, comments or blank lines."""
    import subprocess

    from postgres_server import find_bindir

    dump = subprocess.run(
        [
            str(find_bindir() / "pg_dump"),
            *("--schema-only", "--no-owner", "--no-privileges"),
            "--exclude-table=alembic_version",
            *("-h", server.host, "-p", str(server.port), "-U", "postgres", database),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [
        line
        for line in dump.splitlines()
        if line.strip() and not line.startswith(("--", "\\", "SET ", "SELECT pg_catalog"))
    ]


def _made_by_main(server: PostgresServer, database: str) -> None:
    """A registry as main left it: its schema, a station, an enrolled device and its audit."""
    _run_sql(server, database, MAIN_POSTGRESQL.read_text())
    _run_sql(server, database, (MAIN_POSTGRESQL.parent / "registry_main_rows.sql").read_text())


def test_upgrade_creates_exactly_the_schema_main_wrote(pg_server: PostgresServer) -> None:
    from enrollment.registry.schema import upgrade

    new = pg_server.create_database("schema_new")
    upgrade(new, "0001")
    pg_server.create_database("schema_main")
    _run_sql(pg_server, "schema_main", MAIN_POSTGRESQL.read_text())
    assert _schema_dump(pg_server, "schema_new") == _schema_dump(pg_server, "schema_main")


@pytest.mark.parametrize("release", ["main", "before-hardware-columns"])
def test_a_registry_main_made_is_refused_then_adopted_with_its_data(
    pg_server: PostgresServer, pg_url: str, release: str
) -> None:
    from enrollment.registry import SchemaOutdated
    from enrollment.registry.schema import SchemaStatus, upgrade

    database = _database(pg_url)
    _made_by_main(pg_server, database)
    if release == "before-hardware-columns":
        _run_sql(
            pg_server,
            database,
            "ALTER TABLE device DROP COLUMN key_protection, DROP COLUMN hardware_binding, "
            "DROP COLUMN attestation",
        )
    with pytest.raises(SchemaOutdated, match="run `fleetgate db upgrade` to adopt it"):
        Registry(pg_url)

    assert upgrade(pg_url) == SchemaStatus(None, legacy=True)

    fresh = pg_server.create_database(f"adopted_reference_{next(_database_names)}")
    upgrade(fresh)
    adopted = _schema_dump(pg_server, database)
    if release != "main":  # main's ALTER TABLE gave the columns it added a DEFAULT; so did 0001
        adopted = [re.sub(r" DEFAULT '[^']*'::character varying", "", line) for line in adopted]
    assert adopted == _schema_dump(pg_server, _database(fresh))
    reg = Registry(pg_url)
    try:
        device = reg.device("sensor-1")
        expected = ("tpm", "ab12") if release == "main" else ("software", None)
        assert (device.key_protection, device.hardware_binding) == expected
        facts = reg.admission_facts("sensor-1", 0x1F)
        assert facts.device_state == DeviceState.ACTIVE and facts.acl is not None
        assert facts.certificate is not None and facts.certificate.status == "active"
        reg.audit(AuditRecord("admin:test", "probe", "ok", "sensor-1"))
        assert audit_of(reg, "sensor-1") == [("enroll", "ok"), ("probe", "ok")]
        with pytest.raises(DBAPIError, match="append-only"), reg.engine.begin() as conn:
            conn.execute(text("DELETE FROM auditevent"))
        reg.add_batch("line-1", ["sensor-2"], group="meters", label="after", actor="test")
    finally:
        reg.close()


# -- least privilege ---------------------------------------------------------------------------


def test_service_roles_do_their_work_but_cannot_change_the_schema_or_the_audit_trail(
    pg_server: PostgresServer, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migrations run as the owner; the broker's and the enrollment service's roles own nothing."""
    from broker.admission import Admitted, Identity, decide_admission, read_admission_facts
    from broker.audit import AuditWriter
    from broker.metrics import Metrics
    from enrollment.registry.models import AttestationChallenge
    from enrollment.registry.schema import grant, grant_statements, upgrade

    _run_sql(
        pg_server,
        "postgres",
        "CREATE ROLE fleet_owner LOGIN; CREATE ROLE fleet_broker LOGIN; "
        "CREATE ROLE fleet_enroll LOGIN",
    )
    _run_sql(pg_server, "postgres", "CREATE DATABASE fleet_roles OWNER fleet_owner")
    base = f"postgresql+psycopg://{{}}@{pg_server.host}:{pg_server.port}/fleet_roles"
    owner_url, broker_url, enroll_url = (
        base.format(r) for r in ("fleet_owner", "fleet_broker", "fleet_enroll")
    )
    upgrade(owner_url)
    statements = grant_statements(broker_role="fleet_broker", enrollment_role="fleet_enroll")
    grant(owner_url, statements)
    grant(owner_url, statements)  # as after every upgrade: the same grants, no error

    # The operator (as the owner) prepares a station, a batch and a group's ACL.
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", owner_url)
    config = load_config(home)
    init_ca(config)
    ca = load_ca(config)
    owner = Registry(owner_url)
    _key, station_cert = new_station(EnrollmentService(ca, owner), "line-1", actor="test")
    owner.add_batch("line-1", ["sensor-1", "sensor-2"], group="g", label="t", actor="test")
    owner.set_acl("g", publish=["g/%d/#"], subscribe=[], actor="test")

    # The enrollment service's role enrolls, renews, answers challenges and signs the CRL.
    enroll = Registry(enroll_url)
    service = EnrollmentService(ca, enroll)
    cert = service.enroll(
        station_cert, csr_body("sensor-1", ec.generate_private_key(ec.SECP256R1()))
    )
    cert = service.reenroll(cert, csr_body("sensor-1", ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(EnrollmentRefused):
        service.enroll(station_cert, csr_body("sensor-1", ec.generate_private_key(ec.SECP256R1())))
    now = dt.datetime.now(dt.UTC)
    challenge = AttestationChallenge(
        id="c1",
        actor="station:line-1",
        device_id="sensor-2",
        ak_public="",
        nonce="00",
        secret_sha256="00",
        ek_fingerprint="00",
        expires_at=now + dt.timedelta(minutes=1),
    )
    enroll.add_challenge(
        challenge, AuditRecord("station:line-1", "tpm.challenge", "ok", "sensor-2")
    )
    assert enroll.consume_challenge("c1", actor="station:line-1", now=now).used_at is not None
    service.publish_crl()

    # The broker's role: admission, the change feed, ACLs, batched and single audit writes.
    owner.change_device_state("sensor-2", DeviceState.REVOKED, reason="", actor="test")
    broker = Registry(broker_url)
    identity = Identity("sensor-1", cert.serial_number)
    facts = read_admission_facts(broker, identity)
    admitted = decide_admission(facts, identity, barred=False, will_topic=None)
    assert isinstance(admitted, Admitted) and admitted.group == "g"
    changes = [(c.device_id, c.group) for c in broker.changes_since(0)]
    assert changes == [(None, "g"), ("sensor-2", None)]  # the acl.set, then the revoke
    assert broker.last_change_id() >= 1
    assert broker.acl_patterns("g") is not None
    metrics = Metrics()
    writer = AuditWriter(broker, metrics)
    writer.submit(AuditRecord("device:sensor-1", "mqtt.connect", "ok", "sensor-1"))
    writer.submit(AuditRecord("device:sensor-1", "mqtt.publish", "refused", "sensor-1"))
    asyncio.run(writer.flush())
    assert (metrics.audit_written, metrics.audit_dropped) == (2, 0)
    broker.audit(AuditRecord("device:sensor-1", "mqtt.disconnect", "ok", "sensor-1"))
    assert [a for a, _ in audit_of(owner, "sensor-1")][-3:] == [
        "mqtt.connect",
        "mqtt.publish",
        "mqtt.disconnect",
    ]
    assert owner.verify_audit_chain().ok  # every role's rows extend one hash chain

    refused = {
        "ALTER TABLE device ADD COLUMN backdoor INTEGER": "must be owner",
        "DROP TRIGGER auditevent_append_only ON auditevent": "must be owner",
        "DROP FUNCTION fleetgate_audit_append_only() CASCADE": "must be owner",
        "UPDATE auditevent SET reason = 'rewritten'": "permission denied",
        "DELETE FROM auditevent": "permission denied",
        "TRUNCATE auditevent": "permission denied",
        "DELETE FROM alembic_version": "permission denied",
        "CREATE TABLE shadow (x INTEGER)": "permission denied for schema public",
    }
    for reg in (broker, enroll):
        for statement, says in refused.items():
            with pytest.raises(DBAPIError, match=says), reg.engine.begin() as conn:
                conn.exec_driver_sql(statement)
    for statement in (
        "UPDATE device SET state = 'ACTIVE'",
        "INSERT INTO aclrule VALUES ('g', 'subscribe', '#')",
        "SELECT reason FROM auditevent",
    ):
        with pytest.raises(DBAPIError, match="permission denied"), broker.engine.begin() as conn:
            conn.exec_driver_sql(statement)
    with owner.engine.connect() as conn:
        triggers = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'auditevent'::regclass"
        ).scalars()
        assert list(triggers) == ["auditevent_append_only"]
    for reg in (broker, enroll, owner):
        reg.close()


def test_concurrent_upgrades_of_one_new_database_all_succeed(pg_url: str) -> None:
    """The advisory lock makes the later upgrades wait for the first, then find nothing to do."""
    from upgrade_race import upgrade_concurrently

    from enrollment.registry.schema import HEAD

    assert upgrade_concurrently(pg_url, processes=3) == ["", "", ""]
    reg = Registry(pg_url)
    try:
        with reg.engine.connect() as conn:
            assert list(conn.execute(text("SELECT version_num FROM alembic_version"))) == [(HEAD,)]
    finally:
        reg.close()
