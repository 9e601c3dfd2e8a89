"""Registry tables (SQLModel): devices, certificates, stations, batches and the audit log."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, DateTime, Index, text
from sqlmodel import Field, SQLModel

from fleetgate.ids import SubjectKind as SubjectKind  # the registry stores this enum


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back naive; fleetgate only ever writes UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def member(enum: Any, value: Any) -> Any:
    """An enum member from a processed row (the member) or a raw SQLite one (its stored name)."""
    return value if isinstance(value, enum) else enum[value]


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    # Timezone-aware on PostgreSQL; SQLite stores text and fleetgate always writes UTC.
    column = Column(DateTime(timezone=True), nullable=nullable, index=index)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(default_factory=utcnow, sa_column=column)


class DeviceState(StrEnum):
    PENDING = "pending"  # in a batch, not yet enrolled
    ACTIVE = "active"
    SUSPENDED = "suspended"  # certificate on hold; `device reinstate` re-admits it
    REVOKED = "revoked"  # final: the id can never connect again


class CertStatus(StrEnum):
    ACTIVE = "active"
    ON_HOLD = "on_hold"  # listed in the CRL as certificateHold while its device is suspended
    SUPERSEDED = "superseded"  # replaced by re-enrollment; no longer admitted
    REVOKED = "revoked"


class StationState(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Device(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    group: str = Field(default="default", max_length=64)
    state: DeviceState = Field(default=DeviceState.PENDING, index=True)
    station_id: str | None = Field(default=None, foreign_key="station.id")
    created_at: dt.datetime = _ts()
    updated_at: dt.datetime = _ts()
    # Where the current key lives, as proven at enrollment: "software", "tpm" or "smartcard".
    key_protection: str = Field(default="software", max_length=16)
    # SHA-256 of the hardware root's public key (TPM EK, card attestation key) this id is bound
    # to from its first attested enrollment on; a later enrollment from other hardware is refused.
    hardware_binding: str | None = Field(default=None, max_length=64)
    attestation: str = ""  # one line describing the attestation evidence, for `device show`


# SQLAlchemy's Enum stores a member's *name* ("ACTIVE"), not its value ("active"): SQLite keeps
# the name as text and PostgreSQL's enum type has only the names as labels, so raw SQL must use it.
_ACTIVE_CERT = text(f"status = '{CertStatus.ACTIVE.name}'")


class Certificate(SQLModel, table=True):
    __table_args__ = (
        # The rule behind "two concurrent enrollments yield exactly one active certificate".
        Index(
            "one_active_certificate_per_subject",
            "subject_kind",
            "subject_id",
            unique=True,
            sqlite_where=_ACTIVE_CERT,
            postgresql_where=_ACTIVE_CERT,
        ),
    )

    serial: str = Field(primary_key=True, max_length=42)  # lower-case hex
    subject_kind: SubjectKind
    subject_id: str = Field(index=True, max_length=64)
    fingerprint_sha256: str = Field(unique=True, max_length=64)
    not_before: dt.datetime = _ts()
    not_after: dt.datetime = _ts()
    status: CertStatus = Field(default=CertStatus.ACTIVE, index=True)
    revoked_at: dt.datetime | None = _ts(nullable=True)
    revocation_reason: str | None = None
    pem: str
    issuer_key_id: str | None = Field(default=None, max_length=40, index=True)  # the CA's SKI, hex


class AuthorityRole(StrEnum):
    ROOT = "root"
    ISSUING = "issuing"
    CROSS = "cross"  # a root's key certified by the other root during a root rotation


class AuthorityState(StrEnum):
    ACTIVE = "active"  # the issuing CA that signs now; the current root
    TRUSTED = "trusted"  # no longer signs, still trusted while a rotation overlaps
    RETIRED = "retired"


class CertAuthority(SQLModel, table=True):
    """One CA certificate of the fleet and where it stands in a rotation (stored as values)."""

    fingerprint_sha256: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(max_length=40, index=True)
    role: str = Field(max_length=16)
    state: str = Field(max_length=16, index=True)
    subject: str
    issuer_key_id: str | None = Field(default=None, max_length=40)
    pem: str
    not_after: dt.datetime = _ts()
    created_at: dt.datetime = _ts()
    retired_at: dt.datetime | None = _ts(nullable=True)


class Station(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    state: StationState = Field(default=StationState.ACTIVE)
    created_at: dt.datetime = _ts()


class StationBootstrap(SQLModel, table=True):
    """A one-time code with which a station enrolls its own key over EST (stored hashed only).

    ``code_sha256`` is the SHA-256 of the code, hex: the code is 128 random bits, so a plain
    hash is enough to make a stolen database useless for redeeming it.
    """

    code_sha256: str = Field(primary_key=True, max_length=64)
    station_id: str = Field(foreign_key="station.id", index=True, max_length=64)
    created_by: str
    created_at: dt.datetime = _ts()
    expires_at: dt.datetime = _ts()
    used_at: dt.datetime | None = _ts(nullable=True)


class Batch(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    station_id: str = Field(foreign_key="station.id", index=True)
    label: str = ""
    created_at: dt.datetime = _ts()


class BatchEntry(SQLModel, table=True):
    device_id: str = Field(primary_key=True, foreign_key="device.id")
    batch_id: int = Field(foreign_key="batch.id", index=True)
    enrolled_at: dt.datetime | None = _ts(nullable=True)


class AuditEvent(SQLModel, table=True):
    """Append-only: the database refuses UPDATE, and DELETE of any row the anchor has not
    archived (triggers of migrations/versions/v0002_audit_chain.py). Rows form a hash chain
    (``enrollment.registry.chain``); ids are assigned by the writer, head + 1, never reused."""

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = _ts(index=True)
    actor: str  # e.g. "station:line-1", "device:sensor-17", "admin:root", "peer:127.0.0.1"
    action: str  # e.g. "enroll", "reenroll", "device.revoke", "tls.handshake"
    subject: str | None = Field(default=None, index=True)  # the device or station concerned
    outcome: str  # "ok", "refused" or "error"
    reason: str = ""
    request_id: str | None = None
    prev_hash: str = Field(max_length=64)
    row_hash: str = Field(max_length=64)


class AuditAnchor(SQLModel, table=True):
    """One row: the last archived audit row (id 0 and the genesis hash before any archive).

    The chain's remaining rows start from it; the database lets it move forward only, to a
    row that exists with that hash, and lets rows be deleted only up to it.
    """

    id: int = Field(default=1, primary_key=True)
    last_id: int = 0
    last_hash: str = Field(max_length=64)
    archived_at: dt.datetime | None = _ts(nullable=True)


class DeviceChange(SQLModel, table=True):
    """The change feed: one row per device state change or policy change, in commit order.

    Brokers poll ``id > last_seen`` (see ``Registry.changes_since``) so that a revoke or suspend,
    an ACL change or a device's move to another group, made by any process, reaches every
    broker sharing the registry without a side channel. A row is one of: ``device_id`` and
    ``state`` (a state change); ``device_id`` and ``group`` (the device moved to ``group``);
    ``group`` alone (the group's ACL changed).
    """

    id: int | None = Field(default=None, primary_key=True)
    device_id: str | None = Field(default=None, max_length=64)
    state: DeviceState | None = None
    reason: str = ""
    at: dt.datetime = _ts()
    group: str | None = Field(default=None, max_length=64)


class GroupPolicy(SQLModel, table=True):
    """What a device group demands of its members' keys (``enrollment.policy``)."""

    group: str = Field(primary_key=True, max_length=64)
    required_protection: str = Field(default="none", max_length=16)


class AttestationChallenge(SQLModel, table=True):
    """A TPM attestation challenge: issued once, answered once, within its time to live.

    Only a hash of the credential secret is kept, so a database reader cannot answer it.
    """

    id: str = Field(primary_key=True, max_length=64)
    actor: str = Field(max_length=128)  # who asked; only they may answer
    device_id: str = Field(max_length=64)
    ak_public: str  # base64 of the marshalled TPM2B_PUBLIC of the attestation key
    nonce: str = Field(max_length=64)  # hex
    secret_sha256: str = Field(max_length=64)
    ek_fingerprint: str = Field(max_length=64)
    ek_summary: str = ""
    expires_at: dt.datetime = _ts()
    used_at: dt.datetime | None = _ts(nullable=True)


class AclRule(SQLModel, table=True):
    """One topic pattern of a group's ACL template; ``%d`` stands for the device id."""

    group: str = Field(primary_key=True, max_length=64)
    action: str = Field(primary_key=True, max_length=16)  # "publish" or "subscribe"
    pattern: str = Field(primary_key=True, max_length=512)
