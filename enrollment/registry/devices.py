"""Devices and their certificates: enrollment, renewal, state changes and the CRL's entries.

A certificate row is committed before anyone may hand the certificate out; a device leaves
``pending`` exactly once (a conditional UPDATE, so two concurrent enrollments of one id cannot
both win), and a partial unique index allows one active certificate per subject.
"""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from sqlalchemy import Connection, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from enrollment.attestation import AttestedKey
from enrollment.registry import statements as sql
from enrollment.registry.attestation import bind_hardware
from enrollment.registry.audit import AuditLog, AuditRecord, ChainHead, Lean, append_audit
from enrollment.registry.certificates import certificate_values, revoke_certificates, serial_hex
from enrollment.registry.models import (
    AclRule,
    Certificate,
    CertStatus,
    Device,
    DeviceChange,
    DeviceState,
    GroupPolicy,
    StationState,
    SubjectKind,
    as_utc,
    member,
    utcnow,
)
from fleetgate.errors import (
    AttestationRefused,
    EnrollmentRefused,
    FleetgateError,
    InvalidStateChange,
    NotFound,
)
from fleetgate.ids import validate_id

# The audit action recorded for each target state of a device.
DEVICE_ACTIONS = {
    DeviceState.SUSPENDED: "device.suspend",
    DeviceState.ACTIVE: "device.reinstate",
    DeviceState.REVOKED: "device.revoke",
}


@dataclass(frozen=True)
class EnrollmentTarget:
    """What an enrollment must respect about its device: its group's key policy and binding."""

    device_id: str
    group: str
    required_protection: str  # enrollment.policy.Requirement value; "none" without a policy
    hardware_binding: str | None


@dataclass(frozen=True)
class Issuance:
    """A device's first certificate, signed and waiting to be committed with its audit row;
    ``attested``: the hardware evidence to bind the device to; ``issuer_key_id``: the signer's
    (else read from ``cert``)."""

    station_id: str
    device_id: str
    cert: x509.Certificate
    audit: AuditRecord
    attested: AttestedKey | None = None
    issuer_key_id: str | None = None


@dataclass(frozen=True)
class DeviceKey:
    """What renewal must respect: where the device's key lives and what its group demands."""

    group: str
    key_protection: str
    hardware_binding: str | None
    required_protection: str


@dataclass(frozen=True)
class Credential:
    """The registry's view of a client certificate: its status and its holder's."""

    status: CertStatus
    revoked_at: dt.datetime | None
    reason: str | None
    holder_active: bool


class Devices(AuditLog):
    """Enrolling, renewing, suspending and revoking devices, and reading their certificates."""

    def check_may_enroll(self, station_id: str, device_id: str) -> EnrollmentTarget:
        """Refuse early (before signing) when ``station_id`` may not enroll ``device_id`` now."""
        rows = self._fast_rows(sql.DEVICE_BATCH, {"device_id": device_id})
        if not rows or rows[0][3] != station_id:
            raise EnrollmentRefused(
                f"device {device_id} is not in any batch of station {station_id}: "
                f"add it with `fleetgate batch add {station_id} {device_id}`"
            )
        raw_state, group, binding, _station, required = rows[0]
        state = member(DeviceState, raw_state)
        if state != DeviceState.PENDING:
            raise EnrollmentRefused(
                f"device {device_id} is already enrolled (state {state}); "
                "an enrolled device renews with simplereenroll"
            )
        return EnrollmentTarget(device_id, group, required or "none", binding)

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
        rows = self._fast_rows(query, params)
        if not rows:
            return None
        status, revoked_at, reason, raw_state = rows[0]
        if isinstance(revoked_at, str):  # a raw SQLite row
            revoked_at = dt.datetime.fromisoformat(revoked_at)
        holder = member(StationState if station else DeviceState, raw_state)
        return Credential(
            member(CertStatus, status),
            as_utc(revoked_at) if revoked_at else None,
            reason,
            holder == active,
        )

    def record_enrollment(
        self,
        station_id: str,
        device_id: str,
        cert: x509.Certificate,
        audit: AuditRecord,
        attested: AttestedKey | None = None,
        *,
        issuer_key_id: str | None = None,
    ) -> None:
        """Commit the first certificate of a pending device; exactly one concurrent caller wins.

        With ``attested``, the device is bound to that hardware in the same transaction;
        ``issuer_key_id``: the signer's, when the caller knows it (else read from ``cert``).
        """
        issuance = Issuance(station_id, device_id, cert, audit, attested, issuer_key_id)
        (refusal,) = self.record_enrollments([issuance])
        if refusal is not None:
            raise refusal

    def record_enrollments(self, batch: Sequence[Issuance]) -> list[FleetgateError | None]:
        """Commit several first certificates in one transaction (group commit): per issuance
        its refusal, or None once it is committed.

        Each issuance runs in its own savepoint: one that loses a race (the device was enrolled
        meanwhile, another active certificate, other hardware) is rolled back alone and
        refused, and the others commit. Every issuance's audit row is in the transaction. If
        the transaction itself fails, the exception is raised and none of them is committed.
        """
        now = utcnow()
        refusals: list[FleetgateError | None] = []
        with self.engine.begin() as conn:
            run = functools.partial(self._lean, conn)
            head: ChainHead | None = None
            for issuance in batch:
                try:
                    with self._savepoint(conn):
                        new_head = _activate(conn, run, issuance, now, head)
                except (EnrollmentRefused, AttestationRefused) as refusal:
                    refusals.append(refusal)
                except (IntegrityError, sqlite3.IntegrityError) as exc:  # a unique index: a race
                    refused = EnrollmentRefused(
                        f"device {issuance.device_id} already has an active certificate; "
                        "this one was discarded"
                    )
                    refused.__cause__ = exc
                    refusals.append(refused)
                else:
                    head = new_head  # only a released savepoint moves the audit chain on
                    refusals.append(None)
        return refusals

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
                    bind_hardware(conn, device_id, attested)
                swapped = conn.execute(
                    sql.SUPERSEDE_ACTIVE_CERTIFICATE,
                    {"b_old_serial": serial_hex(old_serial), "now": utcnow()},
                ).rowcount
                if swapped != 1:
                    raise EnrollmentRefused(
                        f"certificate {serial_hex(old_serial)} of {device_id} is no longer current "
                        "(renewed concurrently, suspended or revoked)"
                    )
                _insert_issued(conn, cert, device_id, audit)
        except IntegrityError as exc:
            raise EnrollmentRefused(
                f"device {device_id} already has another active certificate"
            ) from exc

    def device(self, device_id: str) -> Device:
        return self._get(Device, device_id, f"no device {device_id!r} in the registry")

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
                revoke_certificates(s, SubjectKind.DEVICE, device_id, reason)
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

    def move_device(self, device_id: str, group: str, *, actor: str) -> str:
        """Put a device in another group; the group it left.

        The group must be known: ``default``, or one with an ACL template, a key-protection
        policy or a device already (a typo would otherwise leave the device under the default
        ACL). A change-feed row in the same transaction makes every broker apply the new
        group's ACL to the device's live sessions (``broker.feed``); the move is audited with
        both groups.
        """
        validate_id(group, kind="group")
        with self.transaction() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r} in the registry")
            old = device.group or sql.DEFAULT_GROUP
            if device.state == DeviceState.REVOKED:
                raise InvalidStateChange(
                    f"device {device_id} is revoked; it cannot move (revocation is final)"
                )
            if group == old:
                raise InvalidStateChange(f"device {device_id} is already in group {group}")
            if not _group_known(s, group):
                raise NotFound(
                    f"no group {group!r}: give it an ACL first with "
                    f"`fleetgate acl set {group} --publish ... --subscribe ...`"
                )
            device.group = group
            device.updated_at = utcnow()
            s.add(device)
            s.add(DeviceChange(device_id=device_id, group=group, reason=f"moved from {old}"))
            self.audit(
                AuditRecord(actor, "device.move", "ok", device_id, f"group {old} -> {group}"), s
            )
            return old

    def crl_entries(self, issuer_key_id: str | None = None) -> list[tuple[str, dt.datetime, str]]:
        """(serial hex, revocation time, reason) of every withdrawn, unexpired certificate
        (of the CA with that key id, if given: each CA signs a CRL of its own).

        Withdrawn: revoked, on hold, or superseded by a renewal.
        """
        now = utcnow()
        withdrawn = [CertStatus.REVOKED, CertStatus.ON_HOLD, CertStatus.SUPERSEDED]
        query = select(Certificate).where(col(Certificate.status).in_(withdrawn))
        if issuer_key_id is not None:
            query = query.where(col(Certificate.issuer_key_id) == issuer_key_id)
        with self._read_session() as s:
            rows = s.exec(query).all()
            return [
                (r.serial, as_utc(r.revoked_at or now), r.revocation_reason or "unspecified")
                for r in rows
                if as_utc(r.not_after) > now
            ]


def _group_known(s: Session, group: str) -> bool:
    """Whether anything in the registry names ``group`` (the default group always exists)."""
    if group == sql.DEFAULT_GROUP:
        return True
    return any(
        s.exec(select(column).where(column == group).limit(1)).first() is not None
        for column in (col(AclRule.group), col(GroupPolicy.group), col(Device.group))
    )


def _activate(
    conn: Connection, run: Lean, issuance: Issuance, now: dt.datetime, head: ChainHead | None
) -> ChainHead:
    """``issuance``'s writes: the pending device turns active (the conditional UPDATE only one
    caller wins), its batch entry, hardware binding, certificate row and audit row."""
    device_id = issuance.device_id
    params = {"b_device_id": device_id, "b_station_id": issuance.station_id, "now": now}
    if run(sql.ACTIVATE_PENDING_DEVICE, params).rowcount != 1:
        raise EnrollmentRefused(
            f"device {device_id} was enrolled by a concurrent request; "
            "this request's certificate was discarded"
        )
    run(sql.MARK_BATCH_ENTRY_ENROLLED, params)
    if issuance.attested is not None:
        bind_hardware(conn, device_id, issuance.attested)
    row = certificate_values(issuance.cert, SubjectKind.DEVICE, device_id, issuance.issuer_key_id)
    run(sql.INSERT_CERTIFICATE, row)
    return append_audit(conn, issuance.audit, run, head)


def _insert_issued(
    conn: Connection, cert: x509.Certificate, device_id: str, audit: AuditRecord
) -> None:
    conn.execute(sql.INSERT_CERTIFICATE, certificate_values(cert, SubjectKind.DEVICE, device_id))
    append_audit(conn, audit)
