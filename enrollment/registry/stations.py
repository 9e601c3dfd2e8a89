"""Stations (the production lines allowed to enroll) and their batches of device ids."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from sqlalchemy import update
from sqlmodel import Session, col, select

from enrollment.registry import statements as sql
from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.certificates import (
    certificate_values,
    revoke_certificates,
    serial_hex,
)
from enrollment.registry.models import (
    Batch,
    BatchEntry,
    Certificate,
    Device,
    Station,
    StationBootstrap,
    StationState,
    SubjectKind,
    as_utc,
    utcnow,
)
from fleetgate.errors import EnrollmentRefused, InvalidStateChange, NotAuthorised, NotFound
from fleetgate.ids import validate_id


class Stations(AuditLog):
    """Adding, listing and revoking stations; granting them batches of device ids."""

    def add_station(self, station_id: str, cert: x509.Certificate, actor: str) -> None:
        """A station with its first certificate, issued for a CSR the station made."""
        with self.transaction() as s:
            _open_station(s, station_id)
            s.add(Certificate(**certificate_values(cert, SubjectKind.STATION, station_id)))
            self.audit(AuditRecord(actor, "station.add", "ok", station_id, "from its CSR"), s)

    def invite_station(
        self, station_id: str, code_sha256: str, expires_at: dt.datetime, actor: str
    ) -> None:
        """A station without a certificate yet, and the hash of the one-time code with which it
        enrolls its own key over EST (:meth:`redeem_station_code`)."""
        with self.transaction() as s:
            _open_station(s, station_id)
            s.add(
                StationBootstrap(
                    code_sha256=code_sha256,
                    station_id=station_id,
                    created_by=actor,
                    expires_at=expires_at,
                )
            )
            reason = f"bootstrap code issued, valid until {expires_at:%Y-%m-%d %H:%M}Z"
            self.audit(AuditRecord(actor, "station.add", "ok", station_id, reason), s)

    def check_station_code(self, station_id: str, code_sha256: str, now: dt.datetime) -> None:
        """Refuse early (before signing) a code that is unknown, spent, expired or another's."""
        with self._read_session() as s:
            row = s.get(StationBootstrap, code_sha256)
            station = s.get(Station, station_id)
        _check_code(row, station, station_id, now)

    def redeem_station_code(
        self,
        station_id: str,
        code_sha256: str,
        now: dt.datetime,
        cert: x509.Certificate,
        audit: AuditRecord,
    ) -> None:
        """Spend the code and record the station's certificate, in one transaction: of two
        concurrent redemptions exactly one wins (a conditional UPDATE)."""
        with self.transaction() as s:
            spent = s.exec(
                update(StationBootstrap)
                .where(col(StationBootstrap.code_sha256) == code_sha256)
                .where(col(StationBootstrap.station_id) == station_id)
                .where(col(StationBootstrap.used_at).is_(None))
                .where(col(StationBootstrap.expires_at) > now)
                .values(used_at=now)
            ).rowcount
            if spent != 1:
                row, station = s.get(StationBootstrap, code_sha256), s.get(Station, station_id)
                _check_code(row, station, station_id, now)
                raise NotAuthorised(f"the bootstrap code for station {station_id} was just used")
            station = s.get(Station, station_id)
            if station is None or station.state != StationState.ACTIVE:
                raise NotAuthorised(f"station {station_id} is revoked")
            s.add(Certificate(**certificate_values(cert, SubjectKind.STATION, station_id)))
            self.audit(audit, s)

    def record_station_renewal(
        self, station_id: str, old_serial: int, cert: x509.Certificate, audit: AuditRecord
    ) -> None:
        """Swap the station's certificate ``old_serial`` (still active) for ``cert``."""
        with self.transaction() as s:
            station = s.get(Station, station_id)
            if station is None or station.state != StationState.ACTIVE:
                raise NotAuthorised(f"station {station_id} is not active; it may not renew")
            swapped = (
                s.connection()
                .execute(
                    sql.SUPERSEDE_ACTIVE_CERTIFICATE,
                    {"b_old_serial": serial_hex(old_serial), "now": utcnow()},
                )
                .rowcount
            )
            if swapped != 1:
                raise NotAuthorised(
                    f"certificate {serial_hex(old_serial)} of station {station_id} is no longer "
                    "current (renewed concurrently or revoked)"
                )
            s.add(Certificate(**certificate_values(cert, SubjectKind.STATION, station_id)))
            self.audit(audit, s)

    def station(self, station_id: str) -> Station:
        missing = f"no station {station_id!r}: add it with `fleetgate station add`"
        return self._get(Station, station_id, missing)

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
            revoke_certificates(s, SubjectKind.STATION, station_id, reason)
            self.audit(AuditRecord(actor, "station.revoke", "ok", station_id, reason), s)

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


def _open_station(s: Session, station_id: str) -> None:
    """Add ``station_id``, or re-open a revoked one (a replaced line keeps its name)."""
    validate_id(station_id, kind="station")
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


def _check_code(
    row: StationBootstrap | None, station: Station | None, station_id: str, now: dt.datetime
) -> None:
    """Why a bootstrap code may not be redeemed now, as a refusal; nothing if it may."""
    if row is None or row.station_id != station_id:
        raise NotAuthorised(
            f"no such bootstrap code for station {station_id}: ask an operator for a new one "
            f"(`fleetgate station add {station_id}`)"
        )
    if row.used_at is not None:
        raise NotAuthorised(
            f"the bootstrap code for station {station_id} was already used on "
            f"{as_utc(row.used_at):%Y-%m-%d %H:%M}Z; a code works once"
        )
    if as_utc(row.expires_at) <= now:
        raise NotAuthorised(
            f"the bootstrap code for station {station_id} expired on "
            f"{as_utc(row.expires_at):%Y-%m-%d %H:%M}Z; ask an operator for a new one"
        )
    if station is None or station.state != StationState.ACTIVE:
        raise NotAuthorised(f"station {station_id} is revoked")
