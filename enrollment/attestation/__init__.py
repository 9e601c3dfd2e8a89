"""Hardware key attestation: proof that a device key was made in, and cannot leave, a TPM or card.

The verifiers (``tpm``, ``piv``) are pure: evidence bytes and trust anchors in, an
:class:`AttestedKey` or :class:`~fleetgate.errors.AttestationRefused` out. The enrollment service
decides what to do with the result (group policy, the device <-> hardware binding, the
certificate's key-protection policy OID).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["AttestedKey", "KeyProtection"]


class KeyProtection(StrEnum):
    """Where a device key lives, as proven at enrollment."""

    SOFTWARE = "software"  # no attestation: a key file (or an unproven key)
    TPM = "tpm"
    SMARTCARD = "smartcard"


@dataclass(frozen=True)
class AttestedKey:
    """A key the hardware vouched for, and the hardware root the device id becomes bound to."""

    protection: KeyProtection
    public_key: ec.EllipticCurvePublicKey  # the attested key; the CSR must carry this key
    # Hex SHA-256 of the hardware root's SubjectPublicKeyInfo: the TPM's EK, or the card's
    # attestation (slot F9) key. A later enrollment of the same device id must show the same root.
    binding: str
    # One line for the audit trail and `device show`, e.g. "EK RSA-2048 issued by <CN>".
    summary: str
    # trust.check_revocation's line for the audit trail: checked, or why not.
    revocation: str = ""
