"""The registry's promises on a SQLite file: WAL, an append-only audit log, atomic changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from registry_helpers import new_registry
from sqlalchemy import func, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import select

from enrollment.errors import EnrollmentRefused, InvalidDeviceId, InvalidStateChange, NotFound
from enrollment.profiles import DEVICE, ISSUING, STATION, Issuer, Subject, build_certificate
from enrollment.registry import (
    AuditEvent,
    AuditRecord,
    Certificate,
    CertStatus,
    Device,
    DeviceState,
    Registry,
    SubjectKind,
    serial_hex,
)
from enrollment.registry.certificates import certificate_values
from enrollment.registry.models import Batch, BatchEntry

NOW = dt.datetime.now(dt.UTC)


def _certificate_row(cert, kind, subject_id):
    return Certificate(**certificate_values(cert, kind, subject_id))


class Signer:
    """An in-memory issuing CA: enough to mint the certificates the registry records."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        cert = build_certificate(
            ISSUING,
            subject=Subject("registry test CA"),
            public_key=self.key.public_key(),
            issuer=Issuer(self.key, None),
            validity=dt.timedelta(days=365),
            now=NOW,
        )
        self.issuer = Issuer(self.key, cert)

    def device(self, device_id: str) -> x509.Certificate:
        return self._leaf(DEVICE, device_id, f"urn:fleetgate:device:{device_id}")

    def station(self, station_id: str) -> x509.Certificate:
        return self._leaf(STATION, station_id, f"urn:fleetgate:station:{station_id}")

    def _leaf(self, profile, name: str, uri: str) -> x509.Certificate:
        return build_certificate(
            profile,
            subject=Subject(name, uris=(uri,)),
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            issuer=self.issuer,
            validity=dt.timedelta(days=90),
            now=NOW,
        )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = new_registry(f"sqlite:///{tmp_path}/r.db")
    yield reg
    reg.close()


@pytest.fixture
def station(registry: Registry, signer: Signer) -> str:
    registry.add_station("line-1", signer.station("line-1"), actor="test")
    return "line-1"


def _count(registry: Registry, model) -> int:
    with registry.transaction() as s:
        return s.exec(select(func.count()).select_from(model)).one()


def _actions(registry: Registry, subject: str | None = None) -> list[tuple[str, str]]:
    return [(e.action, e.outcome) for e in registry.audit_events(subject=subject)]


def _enroll(registry: Registry, signer: Signer, station: str, device_id: str) -> x509.Certificate:
    cert = signer.device(device_id)
    audit = AuditRecord(f"station:{station}", "enroll", "ok", device_id, "test")
    registry.record_enrollment(station, device_id, cert, audit)
    return cert


def _status(registry: Registry, cert: x509.Certificate) -> Certificate:
    row = registry.certificate(cert.serial_number)
    assert row is not None
    return row


# -- storage settings ------------------------------------------------------------------------


def test_a_file_registry_runs_in_wal_mode_with_foreign_keys(registry):
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_the_registry_reopens_an_existing_file_keeping_its_data(tmp_path, signer):
    url = f"sqlite:///{tmp_path}/r.db"
    first = new_registry(url)
    first.add_station("line-1", signer.station("line-1"), actor="test")
    first.close()
    second = Registry(url)
    try:
        assert [s.id for s in second.stations()] == ["line-1"]
        assert _actions(second) == [("station.add", "ok")]
    finally:
        second.close()


# -- the audit log ---------------------------------------------------------------------------


def test_the_audit_log_refuses_update_through_raw_sql(registry):
    registry.audit(AuditRecord("admin:test", "ca.init", "ok", None, "original"))
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE auditevent SET reason = 'forged', outcome = 'refused'")
    [event] = registry.audit_events()
    assert (event.reason, event.outcome) == ("original", "ok")


def test_the_audit_log_refuses_delete_through_raw_sql(registry):
    registry.audit(AuditRecord("admin:test", "ca.init", "ok"))
    registry.audit(AuditRecord("admin:test", "device.revoke", "ok", "sensor-1"))
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM auditevent")
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.execute(text("DELETE FROM auditevent WHERE subject = :s"), {"s": "sensor-1"})
    assert _actions(registry) == [("ca.init", "ok"), ("device.revoke", "ok")]


def test_the_audit_log_refuses_changes_through_the_orm(registry):
    registry.audit(AuditRecord("admin:test", "ca.init", "ok", None, "original"))
    with pytest.raises(DBAPIError, match="append-only"), registry.transaction() as s:
        event = s.exec(select(AuditEvent)).one()
        event.reason = "forged"
    assert registry.audit_events()[0].reason == "original"


def test_audit_events_are_listed_oldest_first_and_filter_by_subject(registry):
    for n in range(5):
        registry.audit(AuditRecord("admin:test", f"step-{n}", "ok", "a" if n % 2 else "b"))
    assert [e.action for e in registry.audit_events()] == [f"step-{n}" for n in range(5)]
    assert [e.action for e in registry.audit_events(subject="a")] == ["step-1", "step-3"]
    assert [e.action for e in registry.audit_events(limit=2)] == ["step-3", "step-4"]


# -- batches ---------------------------------------------------------------------------------


def test_add_batch_registers_every_device_as_pending_for_its_station(registry, station):
    batch_id = registry.add_batch(station, ["d1", "d2"], group="g1", label="wo-1", actor="t")
    devices = registry.devices()
    assert [(d.id, d.state, d.group, d.station_id) for d in devices] == [
        ("d1", DeviceState.PENDING, "g1", station),
        ("d2", DeviceState.PENDING, "g1", station),
    ]
    with registry.transaction() as s:
        entries = s.exec(select(BatchEntry).order_by(BatchEntry.device_id)).all()
        assert [(e.device_id, e.batch_id, e.enrolled_at) for e in entries] == [
            ("d1", batch_id, None),
            ("d2", batch_id, None),
        ]
    assert ("batch.add", "ok") in _actions(registry, station)


def test_add_batch_with_one_taken_id_adds_nothing(registry, station):
    registry.add_batch(station, ["d2"], group="default", label="first", actor="t")
    before = (_count(registry, Device), _count(registry, Batch), _count(registry, AuditEvent))
    with pytest.raises(EnrollmentRefused, match="d2"):
        registry.add_batch(station, ["d1", "d2", "d3"], group="default", label="x", actor="t")
    after = (_count(registry, Device), _count(registry, Batch), _count(registry, AuditEvent))
    assert after == before
    assert [d.id for d in registry.devices()] == ["d2"]


def test_add_batch_naming_an_id_twice_adds_nothing(registry, station):
    with pytest.raises(EnrollmentRefused, match="twice"):
        registry.add_batch(station, ["d1", "d2", "d1"], group="default", label="", actor="t")
    assert registry.devices() == []


def test_add_batch_with_one_invalid_id_adds_nothing(registry, station):
    with pytest.raises(InvalidDeviceId, match="d/2"):
        registry.add_batch(station, ["d1", "d/2"], group="default", label="", actor="t")
    assert registry.devices() == []
    assert _count(registry, Batch) == 0


def test_add_batch_for_an_unknown_or_revoked_station_adds_nothing(registry, station):
    with pytest.raises(NotFound, match="line-9"):
        registry.add_batch("line-9", ["d1"], group="default", label="", actor="t")
    registry.revoke_station(station, "keyCompromise", actor="t")
    with pytest.raises(NotFound, match=station):
        registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    assert registry.devices() == []


# -- enrollment ------------------------------------------------------------------------------


def test_record_enrollment_commits_device_certificate_and_audit_together(registry, signer, station):
    registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    registry.check_may_enroll(station, "d1")
    cert = _enroll(registry, signer, station, "d1")

    assert registry.device("d1").state == DeviceState.ACTIVE
    row = _status(registry, cert)
    assert (row.subject_kind, row.subject_id, row.status) == (
        SubjectKind.DEVICE,
        "d1",
        CertStatus.ACTIVE,
    )
    assert row.serial == serial_hex(cert.serial_number)
    with registry.transaction() as s:
        assert s.get(BatchEntry, "d1").enrolled_at is not None
    assert _actions(registry, "d1") == [("enroll", "ok")]
    with pytest.raises(EnrollmentRefused, match="already enrolled"):
        registry.check_may_enroll(station, "d1")


def test_a_failed_enrollment_leaves_the_device_pending_and_records_nothing(
    registry, signer, station
):
    registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    taken = registry.certificates_of(SubjectKind.STATION, station)[0]
    clash = x509.load_pem_x509_certificate(taken.pem.encode())  # its serial is already stored
    audit = AuditRecord(f"station:{station}", "enroll", "ok", "d1")
    with pytest.raises(EnrollmentRefused):
        registry.record_enrollment(station, "d1", clash, audit)
    assert registry.device("d1").state == DeviceState.PENDING
    assert registry.certificates_of(SubjectKind.DEVICE, "d1") == []
    with registry.transaction() as s:
        assert s.get(BatchEntry, "d1").enrolled_at is None
    assert _actions(registry, "d1") == []
    _enroll(registry, signer, station, "d1")  # and the device may still enroll
    assert registry.device("d1").state == DeviceState.ACTIVE


def test_a_device_enrolls_only_once(registry, signer, station):
    registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    first = _enroll(registry, signer, station, "d1")
    with pytest.raises(EnrollmentRefused, match="d1"):
        _enroll(registry, signer, station, "d1")
    assert [c.serial for c in registry.certificates_of(SubjectKind.DEVICE, "d1")] == [
        serial_hex(first.serial_number)
    ]
    assert _actions(registry, "d1") == [("enroll", "ok")]


def test_only_the_batch_station_may_enroll_a_device(registry, signer, station):
    registry.add_station("line-2", signer.station("line-2"), actor="t")
    registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    with pytest.raises(EnrollmentRefused, match="line-2"):
        registry.check_may_enroll("line-2", "d1")
    with pytest.raises(EnrollmentRefused):
        _enroll(registry, signer, "line-2", "d1")
    assert registry.device("d1").state == DeviceState.PENDING


def test_the_index_refuses_a_second_active_certificate_for_one_subject(registry, signer):
    with registry.transaction() as s:
        s.add(_certificate_row(signer.device("d1"), SubjectKind.DEVICE, "d1"))
    with pytest.raises(IntegrityError), registry.transaction() as s:
        s.add(_certificate_row(signer.device("d1"), SubjectKind.DEVICE, "d1"))
    assert len(registry.certificates_of(SubjectKind.DEVICE, "d1")) == 1


def test_the_index_allows_inactive_certificates_and_other_subjects_beside_an_active_one(
    registry, signer
):
    with registry.transaction() as s:
        s.add(_certificate_row(signer.device("d1"), SubjectKind.DEVICE, "d1"))
        for status in (CertStatus.SUPERSEDED, CertStatus.REVOKED, CertStatus.ON_HOLD):
            row = _certificate_row(signer.device("d1"), SubjectKind.DEVICE, "d1")
            row.status = status
            s.add(row)
        s.add(_certificate_row(signer.device("d2"), SubjectKind.DEVICE, "d2"))
        s.add(_certificate_row(signer.station("d1"), SubjectKind.STATION, "d1"))
    assert len(registry.certificates_of(SubjectKind.DEVICE, "d1")) == 4


def test_renewal_supersedes_the_old_certificate_and_keeps_one_active(registry, signer, station):
    registry.add_batch(station, ["d1"], group="default", label="", actor="t")
    old = _enroll(registry, signer, station, "d1")
    new = signer.device("d1")
    audit = AuditRecord("device:d1", "reenroll", "ok", "d1")
    registry.record_reenrollment("d1", old.serial_number, new, audit)
    assert _status(registry, old).status == CertStatus.SUPERSEDED
    assert _status(registry, new).status == CertStatus.ACTIVE
    with pytest.raises(EnrollmentRefused, match="no longer current"):
        registry.record_reenrollment("d1", old.serial_number, signer.device("d1"), audit)


# -- device state ----------------------------------------------------------------------------


@pytest.fixture
def enrolled(registry: Registry, signer: Signer, station: str) -> x509.Certificate:
    registry.add_batch(station, ["d1", "d2"], group="default", label="", actor="t")
    _enroll(registry, signer, station, "d2")  # a bystander that must stay untouched
    return _enroll(registry, signer, station, "d1")


def _crl(registry: Registry) -> dict[str, str]:
    return {serial: reason for serial, _, reason in registry.crl_entries()}


def test_suspend_puts_the_certificate_on_hold_and_in_the_crl(registry, enrolled):
    device = registry.change_device_state("d1", DeviceState.SUSPENDED, reason="lost", actor="t")
    assert device.state == DeviceState.SUSPENDED
    assert registry.device("d1").state == DeviceState.SUSPENDED
    row = _status(registry, enrolled)
    assert row.status == CertStatus.ON_HOLD
    assert row.revocation_reason == "certificateHold"
    assert row.revoked_at is not None
    assert _crl(registry) == {serial_hex(enrolled.serial_number): "certificateHold"}
    assert registry.device("d2").state == DeviceState.ACTIVE
    assert ("device.suspend", "ok") in _actions(registry, "d1")


def test_reinstate_returns_a_suspended_device_and_its_certificate_to_active(registry, enrolled):
    registry.change_device_state("d1", DeviceState.SUSPENDED, reason="lost", actor="t")
    registry.change_device_state("d1", DeviceState.ACTIVE, reason="found", actor="t")
    assert registry.device("d1").state == DeviceState.ACTIVE
    row = _status(registry, enrolled)
    assert (row.status, row.revoked_at, row.revocation_reason) == (CertStatus.ACTIVE, None, None)
    assert _crl(registry) == {}
    assert _actions(registry, "d1")[-2:] == [("device.suspend", "ok"), ("device.reinstate", "ok")]


def test_the_change_feed_reads_the_same_through_plain_sqlite3_as_through_sqlalchemy(
    registry, enrolled
):
    """Brokers poll changes_since on a local file through plain sqlite3 (the fast read)."""
    registry.change_device_state("d1", DeviceState.SUSPENDED, reason="lost", actor="t")
    registry.change_device_state("d1", DeviceState.ACTIVE, reason="found", actor="t")
    registry.change_device_state("d2", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    orm_reads = Registry(registry.url)
    orm_reads._fast_reads = None
    assert registry._fast_reads is not None

    def rows(reg: Registry, after: int, limit: int = 1000) -> list[tuple]:
        return [
            (c.id, c.device_id, c.state, c.reason, c.at)
            for c in reg.changes_since(after, limit=limit)
        ]

    everything = rows(registry, 0)
    assert [(r[1], r[2], r[3]) for r in everything] == [
        ("d1", DeviceState.SUSPENDED, "lost"),
        ("d1", DeviceState.ACTIVE, "found"),
        ("d2", DeviceState.REVOKED, "keyCompromise"),
    ]
    assert all(isinstance(r[4], dt.datetime) for r in everything)
    first = everything[0][0]
    for after, limit in ((0, 1000), (first, 1000), (0, 2), (everything[-1][0], 10)):
        assert rows(registry, after, limit) == rows(orm_reads, after, limit)
    assert rows(registry, first, 1) == everything[1:2]
    orm_reads.close()


@pytest.mark.parametrize("first", [None, DeviceState.SUSPENDED])
def test_revoke_is_final_and_lists_the_certificate_with_its_reason(registry, enrolled, first):
    if first is not None:
        registry.change_device_state("d1", first, reason="lost", actor="t")
    registry.change_device_state("d1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    assert registry.device("d1").state == DeviceState.REVOKED
    row = _status(registry, enrolled)
    assert (row.status, row.revocation_reason) == (CertStatus.REVOKED, "keyCompromise")
    assert _crl(registry) == {serial_hex(enrolled.serial_number): "keyCompromise"}

    for target in (DeviceState.ACTIVE, DeviceState.SUSPENDED, DeviceState.REVOKED):
        with pytest.raises(InvalidStateChange, match="final"):
            registry.change_device_state("d1", target, reason="again", actor="t")
    assert registry.device("d1").state == DeviceState.REVOKED
    assert _status(registry, enrolled).revocation_reason == "keyCompromise"


def test_revoke_also_revokes_superseded_certificates(registry, signer, enrolled):
    renewed = signer.device("d1")
    registry.record_reenrollment(
        "d1", enrolled.serial_number, renewed, AuditRecord("device:d1", "reenroll", "ok", "d1")
    )
    registry.change_device_state("d1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    assert _crl(registry) == {
        serial_hex(enrolled.serial_number): "keyCompromise",
        serial_hex(renewed.serial_number): "keyCompromise",
    }


def test_a_pending_device_can_be_revoked_but_not_suspended_or_reinstated(registry, station):
    registry.add_batch(station, ["d9"], group="default", label="", actor="t")
    for target in (DeviceState.SUSPENDED, DeviceState.ACTIVE):
        with pytest.raises(InvalidStateChange, match="pending"):
            registry.change_device_state("d9", target, reason="x", actor="t")
    registry.change_device_state("d9", DeviceState.REVOKED, reason="unspecified", actor="t")
    assert registry.device("d9").state == DeviceState.REVOKED


def test_an_active_device_cannot_be_reinstated(registry, enrolled):
    with pytest.raises(InvalidStateChange, match="active"):
        registry.change_device_state("d1", DeviceState.ACTIVE, reason="x", actor="t")


def test_changing_an_unknown_device_is_not_found(registry):
    with pytest.raises(NotFound, match="nope"):
        registry.change_device_state("nope", DeviceState.REVOKED, reason="x", actor="t")


def test_revoking_a_station_lists_its_certificate_in_the_crl(registry, signer):
    cert = signer.station("line-7")
    registry.add_station("line-7", cert, actor="t")
    registry.revoke_station("line-7", "cessationOfOperation", actor="t")
    assert _crl(registry) == {serial_hex(cert.serial_number): "cessationOfOperation"}
    with pytest.raises(InvalidStateChange, match="already revoked"):
        registry.revoke_station("line-7", "keyCompromise", actor="t")
