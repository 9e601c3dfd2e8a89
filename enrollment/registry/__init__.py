"""The device registry: SQLModel tables and the transactions that change them."""

from enrollment.registry.models import (
    AuditEvent,
    Certificate,
    CertStatus,
    Device,
    DeviceChange,
    DeviceState,
    Station,
    StationState,
    SubjectKind,
)
from enrollment.registry.store import (
    AclPatterns,
    Admission,
    AuditRecord,
    Registry,
    fingerprint,
    serial_hex,
)

__all__ = [
    "AclPatterns",
    "Admission",
    "AuditEvent",
    "AuditRecord",
    "CertStatus",
    "Certificate",
    "Device",
    "DeviceChange",
    "DeviceState",
    "Registry",
    "Station",
    "StationState",
    "SubjectKind",
    "fingerprint",
    "serial_hex",
]
