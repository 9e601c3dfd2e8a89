"""The registry: every state change of devices, stations and certificates, as transactions.

Rules kept here rather than in callers:

* a certificate row is committed before anyone may hand the certificate out;
* a device leaves ``pending`` exactly once (a conditional UPDATE, so two concurrent enrollments
  of one id cannot both win), and a partial unique index allows one active certificate per subject;
* the audit log is append-only, enforced by the database itself.

SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions, so writers queue instead of
failing on lock upgrades; PostgreSQL gets the same guarantees from row locks and the index.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, event, inspect, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, col, create_engine, select

from enrollment.attestation import AttestedKey
from enrollment.errors import AttestationRefused, EnrollmentRefused, InvalidStateChange, NotFound
from enrollment.ids import validate_id
from enrollment.registry import statements as sql
from enrollment.registry.models import (
    AclRule,
    AttestationChallenge,
    AuditEvent,
    Batch,
    BatchEntry,
    Certificate,
    CertStatus,
    Device,
    DeviceChange,
    DeviceState,
    GroupPolicy,
    Station,
    StationState,
    SubjectKind,
    as_utc,
    utcnow,
)

_SQLITE_AUDIT_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS auditevent_append_only_update BEFORE UPDATE ON auditevent "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS auditevent_append_only_delete BEFORE DELETE ON auditevent "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)
_POSTGRES_AUDIT_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION fleetgate_audit_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS auditevent_append_only ON auditevent",
    "CREATE TRIGGER auditevent_append_only BEFORE UPDATE OR DELETE ON auditevent "
    "FOR EACH ROW EXECUTE FUNCTION fleetgate_audit_append_only()",
)


# The audit action recorded for each target state of a device.
DEVICE_ACTIONS = {
    DeviceState.SUSPENDED: "device.suspend",
    DeviceState.ACTIVE: "device.reinstate",
    DeviceState.REVOKED: "device.revoke",
}


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class Admission:
    """Whether a device presenting a certificate may connect now, and if not, why.

    When allowed, ``acl`` is its group's stored template (None: the broker's default).
    """

    allowed: bool
    reason: str
    group: str | None = None
    acl: AclPatterns | None = None


@dataclass(frozen=True)
class AclPatterns:
    """A group's stored ACL template (raw patterns; the broker interprets them)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class AuditRecord:
    """What one audit entry says; ``Registry.audit`` stamps and stores it."""

    actor: str
    action: str
    outcome: str
    subject: str | None = None
    reason: str = ""
    request_id: str | None = None


@dataclass(frozen=True)
class EnrollmentTarget:
    """What an enrollment must respect about its device: its group's key policy and binding."""

    device_id: str
    group: str
    required_protection: str  # enrollment.policy.Requirement value; "none" without a policy
    hardware_binding: str | None


@dataclass(frozen=True)
class DeviceKey:
    """What renewal must respect: where the device's key lives and what its group demands."""

    group: str
    key_protection: str
    hardware_binding: str | None
    required_protection: str


_READ_ONLY = "fleetgate_read_only"

# Columns added after the first release, with the DDL that adds them to an older database.
_ADDED_COLUMNS = {
    "device": {
        "key_protection": "VARCHAR(16) NOT NULL DEFAULT 'software'",
        "hardware_binding": "VARCHAR(64)",
        "attestation": "VARCHAR NOT NULL DEFAULT ''",
    },
}


@dataclass(frozen=True)
class Credential:
    """The registry's view of a client certificate: its status and its holder's."""

    status: CertStatus
    revoked_at: dt.datetime | None
    reason: str | None
    holder_active: bool


def create_registry_engine(url: str) -> Engine:
    """An engine with fleetgate's SQLite settings (WAL, FKs, IMMEDIATE transactions)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    memory = url in {"sqlite://", "sqlite:///:memory:"}
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, not by pysqlite
        cursor = dbapi_conn.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the lock up front, so they queue rather than fail on a lock upgrade;
        # readers (marked by Registry._read) do not block them.
        deferred = conn.info.pop(_READ_ONLY, False)
        # Straight to the driver: SQLAlchemy's own execute path costs more than the BEGIN.
        conn.connection.driver_connection.execute("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


class _SqliteReader:
    """Plain sqlite3 connections (one per thread) for the read every broker CONNECT makes.

    SQLAlchemy's checkout, BEGIN and COMMIT around the ~10 µs indexed admission read cost
    ~140 µs. A single SELECT in autocommit mode reads one consistent WAL snapshot, so nothing is
    lost by skipping them. Rows come back raw: enum columns hold member *names*.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database
        assert database is not None
        self._path = database
        self._dialect = engine.dialect
        self._local = threading.local()
        self._compiled: dict[object, tuple[str, tuple[str, ...]]] = {}
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def rows(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        compiled = self._compiled.get(statement)
        if compiled is None:
            query = statement.compile(dialect=self._dialect)
            compiled = (str(query), tuple(query.positiontup or ()))
            self._compiled[statement] = compiled
        text, order = compiled
        return self._connection().execute(text, [params[name] for name in order]).fetchall()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class Registry:
    """Typed operations on the registry database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_registry_engine(url)
        file_sqlite = self.engine.dialect.name == "sqlite" and url not in {
            "sqlite://",
            "sqlite:///:memory:",
        }
        self._fast_reads = _SqliteReader(self.engine) if file_sqlite else None
        SQLModel.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        triggers = (
            _SQLITE_AUDIT_TRIGGERS
            if self.engine.dialect.name == "sqlite"
            else _POSTGRES_AUDIT_TRIGGERS
        )
        with self.engine.begin() as conn:
            for statement in triggers:
                conn.exec_driver_sql(statement)

    def close(self) -> None:
        if self._fast_reads is not None:
            self._fast_reads.close()
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back (registry unchanged) on error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only Core transaction (deferred on SQLite): the hot paths avoid the ORM."""
        with self.engine.connect() as conn:
            conn.info[_READ_ONLY] = True
            with conn.begin():
                yield conn

    @contextmanager
    def _read_session(self) -> Iterator[Session]:
        """An ORM session over a read-only transaction (deferred on SQLite: no write lock)."""
        with self._read() as conn, Session(bind=conn, expire_on_commit=False) as session:
            yield session

    # -- audit -----------------------------------------------------------------------------

    def audit(self, record: AuditRecord, session: Session | None = None) -> None:
        """Append ``record``; inside ``session`` when the entry must commit with a change."""
        row = AuditEvent(**_audit_values(record))
        if session is not None:
            session.add(row)
            return
        with self.engine.begin() as conn:
            conn.execute(sql.INSERT_AUDIT, _audit_values(record))

    def audit_events(self, *, subject: str | None = None, limit: int = 100) -> list[AuditEvent]:
        with self._read_session() as s:
            query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
            if subject is not None:
                query = query.where(AuditEvent.subject == subject)
            return list(reversed(s.exec(query).all()))

    # -- stations --------------------------------------------------------------------------

    def add_station(self, station_id: str, cert: x509.Certificate, actor: str) -> None:
        validate_id(station_id, kind="station")
        with self.transaction() as s:
            existing = s.get(Station, station_id)
            if existing is not None and existing.state == StationState.ACTIVE:
                raise InvalidStateChange(
                    f"station {station_id} exists and is active; revoke it first to replace it"
                )
            if existing is None:
                s.add(Station(id=station_id))
            else:
                existing.state = StationState.ACTIVE
            s.flush()
            s.add(Certificate(**_certificate_values(cert, SubjectKind.STATION, station_id)))
            self.audit(AuditRecord(actor, "station.add", "ok", subject=station_id), s)

    def station(self, station_id: str) -> Station:
        with self._read_session() as s:
            row = s.get(Station, station_id)
            if row is None:
                raise NotFound(f"no station {station_id!r}: add it with `fleetgate station add`")
            return row

    def stations(self) -> list[Station]:
        with self._read_session() as s:
            return list(s.exec(select(Station).order_by(Station.id)).all())

    def revoke_station(self, station_id: str, reason: str, actor: str) -> None:
        with self.transaction() as s:
            row = s.get(Station, station_id)
            if row is None:
                raise NotFound(f"no station {station_id!r}")
            if row.state == StationState.REVOKED:
                raise InvalidStateChange(f"station {station_id} is already revoked")
            row.state = StationState.REVOKED
            _revoke_certificates(s, SubjectKind.STATION, station_id, reason)
            self.audit(AuditRecord(actor, "station.revoke", "ok", station_id, reason), s)

    # -- batches ---------------------------------------------------------------------------

    def add_batch(
        self, station_id: str, device_ids: Sequence[str], *, group: str, label: str, actor: str
    ) -> int:
        """Allow ``station_id`` to enroll ``device_ids``: all are added, or none."""
        ids = [validate_id(d) for d in device_ids]
        validate_id(group, kind="group")
        if len(set(ids)) != len(ids):
            raise EnrollmentRefused("the batch names a device id twice")
        with self.transaction() as s:
            station = s.get(Station, station_id)
            if station is None or station.state != StationState.ACTIVE:
                raise NotFound(
                    f"no active station {station_id!r}: add it with `fleetgate station add`"
                )
            taken = s.exec(select(Device.id).where(col(Device.id).in_(ids))).all()
            if taken:
                raise EnrollmentRefused(
                    f"device id(s) already registered: {', '.join(sorted(taken)[:10])}; "
                    "ids are never reused"
                )
            batch = Batch(station_id=station_id, label=label)
            s.add(batch)
            s.flush()
            assert batch.id is not None
            for device_id in ids:
                s.add(Device(id=device_id, group=group, station_id=station_id))
            s.flush()
            for device_id in ids:
                s.add(BatchEntry(device_id=device_id, batch_id=batch.id))
            self.audit(
                AuditRecord(
                    actor, "batch.add", "ok", station_id, f"{len(ids)} device(s), group {group}"
                ),
                s,
            )
            return batch.id

    # -- enrollment ------------------------------------------------------------------------

    def check_may_enroll(self, station_id: str, device_id: str) -> EnrollmentTarget:
        """Refuse early (before signing) when ``station_id`` may not enroll ``device_id`` now."""
        with self._read() as conn:
            row = conn.execute(sql.DEVICE_BATCH, {"device_id": device_id}).first()
        if row is None or row.station_id != station_id:
            raise EnrollmentRefused(
                f"device {device_id} is not in any batch of station {station_id}: "
                f"add it with `fleetgate batch add {station_id} {device_id}`"
            )
        if row.state != DeviceState.PENDING:
            raise EnrollmentRefused(
                f"device {device_id} is already enrolled (state {row.state}); "
                "an enrolled device renews with simplereenroll"
            )
        return EnrollmentTarget(
            device_id, row.group, row.required_protection or "none", row.hardware_binding
        )

    def device_key(self, device_id: str) -> DeviceKey:
        """The device's key protection and its group's requirement, for renewal decisions."""
        with self._read() as conn:
            row = conn.execute(sql.DEVICE_KEY, {"device_id": device_id}).first()
        if row is None:
            raise NotFound(f"no device {device_id!r} in the registry")
        return DeviceKey(
            row.group, row.key_protection, row.hardware_binding, row.required_protection or "none"
        )

    def credential(self, kind: SubjectKind, subject_id: str, serial: int) -> Credential | None:
        """The status of certificate ``serial`` if it was issued to ``kind`` ``subject_id``."""
        station = kind == SubjectKind.STATION
        query = sql.STATION_CREDENTIAL if station else sql.DEVICE_CREDENTIAL
        active = StationState.ACTIVE if station else DeviceState.ACTIVE
        params = {"serial": serial_hex(serial), "kind": kind, "subject_id": subject_id}
        with self._read() as conn:
            row = conn.execute(query, params).first()  # type: ignore[call-overload]
        if row is None:
            return None
        revoked_at = as_utc(row.revoked_at) if row.revoked_at else None
        return Credential(row.status, revoked_at, row.revocation_reason, row.state == active)

    def record_enrollment(
        self,
        station_id: str,
        device_id: str,
        cert: x509.Certificate,
        audit: AuditRecord,
        attested: AttestedKey | None = None,
    ) -> None:
        """Commit the first certificate of a pending device; exactly one concurrent caller wins.

        With ``attested``, the device is bound to that hardware in the same transaction.
        """
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                params = {"b_device_id": device_id, "b_station_id": station_id, "now": now}
                won = conn.execute(sql.ACTIVATE_PENDING_DEVICE, params).rowcount
                if won != 1:
                    raise EnrollmentRefused(
                        f"device {device_id} was enrolled by a concurrent request; "
                        "this request's certificate was discarded"
                    )
                conn.execute(sql.MARK_BATCH_ENTRY_ENROLLED, params)
                if attested is not None:
                    _bind_hardware(conn, device_id, attested)
                self._insert_issued(conn, cert, device_id, audit)
        except IntegrityError as exc:  # the partial unique index caught a race
            raise EnrollmentRefused(
                f"device {device_id} already has an active certificate; this one was discarded"
            ) from exc

    def record_reenrollment(
        self,
        device_id: str,
        old_serial: int,
        cert: x509.Certificate,
        audit: AuditRecord,
        attested: AttestedKey | None = None,
    ) -> None:
        """Swap the device's active certificate for ``cert``, if ``old_serial`` is still it.

        With ``attested`` (a hardware key rotation), the binding must hold and is re-recorded.
        """
        try:
            with self.engine.begin() as conn:
                state = conn.execute(sql.DEVICE_STATE, {"device_id": device_id}).scalar()
                if state != DeviceState.ACTIVE:
                    raise EnrollmentRefused(f"device {device_id} is not active; it may not renew")
                if attested is not None:
                    _bind_hardware(conn, device_id, attested)
                swapped = conn.execute(
                    sql.SUPERSEDE_ACTIVE_CERTIFICATE,
                    {"b_old_serial": serial_hex(old_serial), "now": utcnow()},
                ).rowcount
                if swapped != 1:
                    raise EnrollmentRefused(
                        f"certificate {serial_hex(old_serial)} of {device_id} is no longer current "
                        "(renewed concurrently, suspended or revoked)"
                    )
                self._insert_issued(conn, cert, device_id, audit)
        except IntegrityError as exc:
            raise EnrollmentRefused(
                f"device {device_id} already has another active certificate"
            ) from exc

    @staticmethod
    def _insert_issued(
        conn: Connection, cert: x509.Certificate, device_id: str, audit: AuditRecord
    ) -> None:
        conn.execute(
            sql.INSERT_CERTIFICATE, _certificate_values(cert, SubjectKind.DEVICE, device_id)
        )
        conn.execute(sql.INSERT_AUDIT, _audit_values(audit))

    # -- devices ---------------------------------------------------------------------------

    def device(self, device_id: str) -> Device:
        with self._read_session() as s:
            row = s.get(Device, device_id)
            if row is None:
                raise NotFound(f"no device {device_id!r} in the registry")
            return row

    def devices(self, *, state: DeviceState | None = None) -> list[Device]:
        with self._read_session() as s:
            query = select(Device).order_by(Device.id)
            if state is not None:
                query = query.where(Device.state == state)
            return list(s.exec(query).all())

    def certificates_of(self, kind: SubjectKind, subject_id: str) -> list[Certificate]:
        with self._read_session() as s:
            query = (
                select(Certificate)
                .where(Certificate.subject_kind == kind, Certificate.subject_id == subject_id)
                .order_by(col(Certificate.not_before))
            )
            return list(s.exec(query).all())

    def certificate(self, serial: int) -> Certificate | None:
        with self._read_session() as s:
            return s.get(Certificate, serial_hex(serial))

    def change_device_state(
        self, device_id: str, target: DeviceState, *, reason: str, actor: str
    ) -> Device:
        """Suspend, reinstate or revoke a device, moving its certificates along."""
        allowed = {
            DeviceState.SUSPENDED: {DeviceState.ACTIVE},
            DeviceState.ACTIVE: {DeviceState.SUSPENDED},
            DeviceState.REVOKED: {DeviceState.PENDING, DeviceState.ACTIVE, DeviceState.SUSPENDED},
        }[target]
        action = DEVICE_ACTIONS[target]
        with self.transaction() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r} in the registry")
            if device.state not in allowed:
                hint = (
                    " (revocation is final: enroll a new device id)"
                    if device.state == "revoked"
                    else ""
                )
                raise InvalidStateChange(
                    f"device {device_id} is {device.state}; cannot {action.split('.')[1]} it{hint}"
                )
            if target == DeviceState.REVOKED:
                _revoke_certificates(s, SubjectKind.DEVICE, device_id, reason)
            else:
                source, dest = (
                    (CertStatus.ACTIVE, CertStatus.ON_HOLD)
                    if target == DeviceState.SUSPENDED
                    else (CertStatus.ON_HOLD, CertStatus.ACTIVE)
                )
                s.exec(
                    update(Certificate)
                    .where(col(Certificate.subject_kind) == SubjectKind.DEVICE)
                    .where(col(Certificate.subject_id) == device_id)
                    .where(col(Certificate.status) == source)
                    .values(
                        status=dest,
                        revoked_at=utcnow() if dest == CertStatus.ON_HOLD else None,
                        revocation_reason="certificateHold" if dest == CertStatus.ON_HOLD else None,
                    )
                )
            device.state = target
            device.updated_at = utcnow()
            s.add(DeviceChange(device_id=device_id, state=target, reason=reason))
            self.audit(AuditRecord(actor, action, "ok", device_id, reason), s)
            return device

    # -- hardware attestation ----------------------------------------------------------------

    def add_challenge(self, challenge: AttestationChallenge, audit: AuditRecord) -> None:
        with self.transaction() as s:
            s.add(challenge)
            self.audit(audit, s)

    def consume_challenge(
        self, challenge_id: str, *, actor: str, now: dt.datetime
    ) -> AttestationChallenge:
        """Mark the challenge answered and return it; each challenge is answered at most once.

        Committed before the evidence is checked: a failed answer burns the challenge too, so
        evidence cannot be retried against the same nonce.
        """
        with self.transaction() as s:
            row = s.get(AttestationChallenge, challenge_id, with_for_update=True)
            if row is None or row.actor != actor:
                raise AttestationRefused(
                    f"unknown attestation challenge {challenge_id!r} for {actor}; "
                    "request a new challenge"
                )
            if row.used_at is not None:
                raise AttestationRefused(
                    f"attestation challenge {challenge_id} was already answered at "
                    f"{as_utc(row.used_at):%H:%M:%S}Z (a replay?); request a new challenge"
                )
            expires_at = as_utc(row.expires_at)
            if now >= expires_at:
                raise AttestationRefused(
                    f"attestation challenge {challenge_id} expired at {expires_at:%H:%M:%S}Z; "
                    "request a new challenge and answer it promptly"
                )
            row.used_at = now
            s.add(row)
            return row

    def set_group_policy(self, group: str, required_protection: str, actor: str) -> None:
        validate_id(group, kind="group")
        with self.transaction() as s:
            row = s.get(GroupPolicy, group) or GroupPolicy(group=group)
            row.required_protection = required_protection
            s.add(row)
            self.audit(
                AuditRecord(actor, "group.policy", "ok", group, f"require {required_protection}"),
                s,
            )

    def group_policies(self) -> list[GroupPolicy]:
        with self._read_session() as s:
            return list(s.exec(select(GroupPolicy).order_by(GroupPolicy.group)).all())

    # -- what brokers ask --------------------------------------------------------------------

    def admission(self, device_id: str, serial: int) -> Admission:
        """May ``device_id`` connect with the certificate ``serial``? Only its active one may.

        One statement reads the device, the certificate and the group's ACL (every CONNECT
        pays for this read, so it avoids the ORM).
        """
        params = {"device_id": device_id, "serial": serial_hex(serial)}
        if self._fast_reads is not None:
            rows = self._fast_reads.rows(sql.ADMISSION, params)
        else:
            with self._read() as conn:
                rows = list(conn.execute(sql.ADMISSION, params).all())
        if not rows:
            return Admission(False, f"device {device_id} is not in the registry")
        state, group, cert_serial, kind, subject, status = rows[0][:6]
        state = _member(DeviceState, state)
        kind = _member(SubjectKind, kind) if kind is not None else None
        status = _member(CertStatus, status) if status is not None else None
        group = group or sql.DEFAULT_GROUP
        if state != DeviceState.ACTIVE:
            return Admission(False, f"device {device_id} is {state}", group)
        if cert_serial is None or kind != SubjectKind.DEVICE or subject != device_id:
            return Admission(
                False, f"certificate {serial_hex(serial)} was not issued to {device_id}"
            )
        if status != CertStatus.ACTIVE:
            renewed = (
                ": connect with the renewed certificate" if status == CertStatus.SUPERSEDED else ""
            )
            return Admission(
                False, f"certificate {cert_serial} of {device_id} is {status}{renewed}", group
            )
        rules = [(action, pattern) for *_, action, pattern in rows if action is not None]
        return Admission(True, "", group, _acl_patterns(rules))

    def changes_since(self, after_id: int, *, limit: int = 1000) -> list[DeviceChange]:
        """Device state changes committed after ``after_id``, oldest first."""
        params = {"after_id": after_id, "limit": limit, "offset": 0}
        if self._fast_reads is not None:
            rows = self._fast_reads.rows(sql.CHANGES_SINCE, params)
        else:
            with self._read() as conn:
                rows = list(conn.execute(sql.CHANGES_SINCE, params).all())
        return [
            DeviceChange(
                id=change_id,
                device_id=device_id,
                state=_member(DeviceState, state),
                reason=reason,
                at=at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(at),
            )
            for change_id, device_id, state, reason, at in rows
        ]

    @property
    def reads_locally(self) -> bool:
        """Whether the database is local SQLite, whose :meth:`admission` and
        :meth:`changes_since` are cheap enough for an event loop; PostgreSQL's cross a network:
        ask in a thread."""
        return self.engine.dialect.name == "sqlite"

    def last_change_id(self) -> int:
        with self._read_session() as s:
            latest = s.exec(select(DeviceChange.id).order_by(col(DeviceChange.id).desc())).first()
            return latest or 0

    def acl_patterns(self, group: str) -> AclPatterns | None:
        """The group's stored ACL template, or None when it has none (the broker's default)."""
        with self._read_session() as s:
            rows = s.exec(select(AclRule).where(AclRule.group == group)).all()
        return _acl_patterns([(r.action, r.pattern) for r in rows])

    def set_acl(
        self, group: str, *, publish: Sequence[str], subscribe: Sequence[str], actor: str
    ) -> None:
        """Replace a group's ACL template in one transaction."""
        validate_id(group, kind="group")
        with self.transaction() as s:
            for row in s.exec(select(AclRule).where(AclRule.group == group)).all():
                s.delete(row)
            s.flush()
            for action, patterns in (("publish", publish), ("subscribe", subscribe)):
                for pattern in dict.fromkeys(patterns):
                    s.add(AclRule(group=group, action=action, pattern=pattern))
            summary = f"publish {list(publish)} subscribe {list(subscribe)}"
            self.audit(AuditRecord(actor, "acl.set", "ok", group, summary), s)

    def crl_entries(self) -> list[tuple[str, dt.datetime, str]]:
        """(serial hex, revocation time, reason) of every withdrawn, unexpired certificate.

        Withdrawn: revoked, on hold, or superseded by a renewal.
        """
        now = utcnow()
        withdrawn = [CertStatus.REVOKED, CertStatus.ON_HOLD, CertStatus.SUPERSEDED]
        with self._read_session() as s:
            rows = s.exec(select(Certificate).where(col(Certificate.status).in_(withdrawn))).all()
            return [
                (r.serial, as_utc(r.revoked_at or now), r.revocation_reason or "unspecified")
                for r in rows
                if as_utc(r.not_after) > now
            ]


def _member(enum: Any, value: Any) -> Any:
    """An enum member from a processed row (the member) or a raw one (its stored name)."""
    return value if isinstance(value, enum) else enum[value]


def _acl_patterns(rules: Sequence[tuple[str, str]]) -> AclPatterns | None:
    """(action, pattern) rows as a template; None when the group stores none."""
    if not rules:
        return None
    return AclPatterns(
        publish=tuple(sorted(p for action, p in rules if action == "publish")),
        subscribe=tuple(sorted(p for action, p in rules if action == "subscribe")),
    )


def _bind_hardware(conn: Connection, device_id: str, attested: AttestedKey) -> None:
    """Record the key's protection; refuse if the device is bound to other hardware."""
    params = {
        "b_device_id": device_id,
        "b_binding": attested.binding,
        "protection": str(attested.protection),
        "summary": attested.summary,
    }
    if conn.execute(sql.BIND_HARDWARE, params).rowcount != 1:
        raise AttestationRefused(
            f"device {device_id} is bound to other hardware; a device id never moves to "
            "another TPM or card: provision a new device id for this hardware"
        )


def _add_missing_columns(engine: Engine) -> None:
    """Bring a registry created by an older fleetgate up to the current columns."""
    with engine.begin() as conn:
        inspector = inspect(conn)
        for table, columns in _ADDED_COLUMNS.items():
            present = {c["name"] for c in inspector.get_columns(table)}
            for name, ddl in columns.items():
                if name not in present:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


def _audit_values(record: AuditRecord) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "outcome": record.outcome,
        "reason": record.reason,
        "request_id": record.request_id,
    }


def _certificate_values(
    cert: x509.Certificate, kind: SubjectKind, subject_id: str
) -> dict[str, Any]:
    """A new certificate row as plain values (building a SQLModel instance costs ~0.1 ms)."""
    return {
        "serial": serial_hex(cert.serial_number),
        "subject_kind": kind,
        "subject_id": subject_id,
        "fingerprint_sha256": fingerprint(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "status": CertStatus.ACTIVE,
        "revoked_at": None,
        "revocation_reason": None,
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _revoke_certificates(s: Session, kind: SubjectKind, subject_id: str, reason: str) -> None:
    s.exec(
        update(Certificate)
        .where(col(Certificate.subject_kind) == kind)
        .where(col(Certificate.subject_id) == subject_id)
        .where(
            col(Certificate.status).in_(
                [CertStatus.ACTIVE, CertStatus.ON_HOLD, CertStatus.SUPERSEDED]
            )
        )
        .values(status=CertStatus.REVOKED, revoked_at=utcnow(), revocation_reason=reason)
    )
