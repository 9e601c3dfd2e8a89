"""The registry: every state change of devices, stations and certificates, as transactions.

:class:`Registry` is composed of one class per aggregate, each in its own module:

* ``stations`` -- stations and their batches of device ids;
* ``devices`` -- devices and their certificates: enrollment, renewal, suspension, revocation;
* ``attestation`` -- attestation challenges, group key policies, hardware binding;
* ``broker_reads`` -- what brokers ask: admission, the revocation change feed, ACL templates;
* ``authorities`` -- the CA certificates and their rotation state;
* ``audit`` -- the append-only audit trail, which every other aggregate writes to;

on top of ``engine`` (connections and transactions). Opening a registry never changes its schema:
it checks the schema's revision (``schema``) and refuses an outdated one.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

from enrollment.registry import schema
from enrollment.registry.acl import AclPatterns
from enrollment.registry.attestation import Attestation
from enrollment.registry.audit import AuditRecord
from enrollment.registry.authorities import Authorities
from enrollment.registry.broker_reads import AdmissionFacts, BrokerReads, CertificateFacts
from enrollment.registry.certificates import fingerprint, serial_hex
from enrollment.registry.devices import (
    DEVICE_ACTIONS,
    Credential,
    DeviceKey,
    Devices,
    EnrollmentTarget,
)
from enrollment.registry.engine import unreachable
from enrollment.registry.stations import Stations

__all__ = [
    "DEVICE_ACTIONS",
    "AclPatterns",
    "AdmissionFacts",
    "AuditRecord",
    "CertificateFacts",
    "Credential",
    "DeviceKey",
    "EnrollmentTarget",
    "Registry",
    "fingerprint",
    "serial_hex",
]


class Registry(Stations, Devices, Attestation, BrokerReads, Authorities):
    """Typed operations on the registry database, whose schema must be current.

    Raises :class:`~enrollment.registry.schema.SchemaOutdated` (naming ``fleetgate db
    upgrade``) when the database has no registry schema or an older or newer one.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        try:
            self._check_schema()
        except BaseException:
            self.close()
            raise

    def _check_schema(self) -> None:
        """One read of the version row; the tables are inspected only to word a refusal."""
        try:
            with self._read() as conn:
                revision = schema.read_revision(conn)
        except DBAPIError as exc:
            if unreachable(exc):  # asking again would only wait for a second connect timeout
                raise
            state = schema.status(self.engine)
            if state.revision is not None:  # the version table is there: another failure
                raise
            revision = None
        refusal = schema.refusal(self.engine, revision)
        if refusal is not None:
            raise refusal
