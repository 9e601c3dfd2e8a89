"""Stations (the production lines allowed to enroll) and their batches of device ids."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from sqlmodel import col, select

from enrollment.errors import EnrollmentRefused, InvalidStateChange, NotFound
from enrollment.ids import validate_id
from enrollment.registry.audit import AuditLog, AuditRecord
from enrollment.registry.certificates import certificate_values, revoke_certificates
from enrollment.registry.models import (
    Batch,
    BatchEntry,
    Certificate,
    Device,
    Station,
    StationState,
    SubjectKind,
)


class Stations(AuditLog):
    """Adding, listing and revoking stations; granting them batches of device ids."""

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
            s.add(Certificate(**certificate_values(cert, SubjectKind.STATION, station_id)))
            self.audit(AuditRecord(actor, "station.add", "ok", subject=station_id), s)

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
