"""The device registry: SQLModel tables, the transactions that change them, and its schema's
versioned migrations (``schema``)."""

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
from enrollment.registry.schema import SchemaOutdated
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
    "SchemaOutdated",
    "Station",
    "StationState",
    "SubjectKind",
    "fingerprint",
    "serial_hex",
]
