"""The device registry: SQLModel tables and the transactions that change them."""

from enrollment.registry.models import (
    AuditEvent,
    Certificate,
    CertStatus,
    Device,
    DeviceState,
    Station,
    StationState,
    SubjectKind,
)
from enrollment.registry.store import AuditRecord, Registry, fingerprint, serial_hex

__all__ = [
    "AuditEvent",
    "AuditRecord",
    "CertStatus",
    "Certificate",
    "Device",
    "DeviceState",
    "Registry",
    "Station",
    "StationState",
    "SubjectKind",
    "fingerprint",
    "serial_hex",
]
