"""Typed errors of the enrollment service.

Every refusal the service makes is one of these, carrying a message a person can act on and a
short machine-readable ``code`` that lands in the audit trail and in HTTP problem responses.
"""

from __future__ import annotations


class FleetgateError(Exception):
    """Base of every error fleetgate raises on purpose."""

    code = "error"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.audited = False  # set once the refusal is in the audit log, so it is logged once


class ConfigError(FleetgateError):
    """The configuration or data directory is unusable."""

    code = "bad_config"


class InvalidDeviceId(FleetgateError):
    """A device id breaks the id rules (it would be unsafe inside an MQTT topic)."""

    code = "invalid_device_id"
    http_status = 400


class CANotInitialised(FleetgateError):
    """The CA has not been created in this data directory yet."""

    code = "ca_not_initialised"


class CAPassphraseError(FleetgateError):
    """The CA passphrase is missing or does not decrypt the CA key."""

    code = "ca_passphrase"


class CSRRejected(FleetgateError):
    """A certificate signing request breaks the wire format or the device profile."""

    code = "bad_csr"
    http_status = 400


class NotAuthorised(FleetgateError):
    """The caller's credentials do not allow this request."""

    code = "not_authorised"
    http_status = 403


class EnrollmentRefused(FleetgateError):
    """The registry's state forbids this enrollment (not in a batch, already enrolled, ...)."""

    code = "enrollment_refused"
    http_status = 409


class NotFound(FleetgateError):
    """A named device, station or certificate does not exist."""

    code = "not_found"
    http_status = 404


class InvalidStateChange(FleetgateError):
    """The requested change is not allowed from the subject's current state."""

    code = "invalid_state"
    http_status = 409


class AttestationRefused(FleetgateError):
    """Hardware key attestation failed: the key is not proven to live in a trusted TPM or card."""

    code = "attestation_refused"
    http_status = 403


class KeyProtectionRequired(FleetgateError):
    """The device's group requires a stronger key protection than this enrollment proved."""

    code = "key_protection_required"
    http_status = 403


class MalformedRequest(FleetgateError):
    """A request body is not the JSON message the endpoint documents."""

    code = "bad_request"
    http_status = 400
