"""Key-protection policy: which proven key protections a device group accepts. Pure functions.

A group's requirement is set with ``fleetgate group require``; enrollment checks the protection
the evidence proved (software, tpm, smartcard) against it before anything is signed.
"""

from __future__ import annotations

from enum import StrEnum

from enrollment.attestation import KeyProtection
from fleetgate.errors import KeyProtectionRequired

__all__ = ["Requirement", "check_protection", "parse_requirement"]


class Requirement(StrEnum):
    NONE = "none"  # any key, attested or not
    TPM = "tpm"
    SMARTCARD = "smartcard"
    ANY_HARDWARE = "any-hardware"  # a TPM or a smartcard


_ACCEPTS: dict[Requirement, frozenset[KeyProtection]] = {
    Requirement.NONE: frozenset(KeyProtection),
    Requirement.TPM: frozenset({KeyProtection.TPM}),
    Requirement.SMARTCARD: frozenset({KeyProtection.SMARTCARD}),
    Requirement.ANY_HARDWARE: frozenset({KeyProtection.TPM, KeyProtection.SMARTCARD}),
}

_HOW = {
    Requirement.TPM: "enroll it through the TPM attestation flow (fleetgate/tpm/challenge)",
    Requirement.SMARTCARD: "enroll it with its smartcard's attestation (fleetgate/piv/enroll)",
    Requirement.ANY_HARDWARE: "enroll it with TPM or smartcard attestation",
}


def parse_requirement(text: str) -> Requirement:
    try:
        return Requirement(text)
    except ValueError:
        choices = ", ".join(r.value for r in Requirement)
        raise KeyProtectionRequired(
            f"unknown key protection requirement {text!r}; choose one of {choices}"
        ) from None


def check_protection(*, device_id: str, group: str, required: str, proven: KeyProtection) -> None:
    """Refuse when ``proven`` does not satisfy the group's ``required`` protection."""
    requirement = parse_requirement(required)
    if proven in _ACCEPTS[requirement]:
        return
    shown = "no attestation (a software key)" if proven == KeyProtection.SOFTWARE else proven
    raise KeyProtectionRequired(
        f"group {group} requires {requirement} key protection, but device {device_id} "
        f"presented {shown}; {_HOW[requirement]}"
    )
