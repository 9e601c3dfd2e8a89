"""PIV smartcard attestation (YubiKey style): proof that a key was generated on a trusted card.

The card holds an attestation key (slot F9) whose certificate its manufacturer's CA issued at
manufacture. On request (INS F9) the card issues a certificate for a key it generated in another
slot, signed with the F9 key. A key imported into the card cannot get one, and a software key
cannot get one without a card's F9 key. So a chain

    attestation certificate (slot key) -> F9 certificate -> configured card-manufacturer CA

whose leaf carries the CSR's public key proves the CSR's key lives on a genuine card. The F9
key's fingerprint identifies the card: the enrollment service binds the device id to it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment.attestation import AttestedKey, KeyProtection
from enrollment.attestation.trust import (
    CrlPolicy,
    check_revocation,
    describe,
    key_fingerprint,
    load_certificate,
    verify_chain,
)
from fleetgate.errors import AttestationRefused


def verify_piv_attestation(
    *,
    attestation_certificate: bytes,
    attestation_intermediate: bytes,
    anchors: Sequence[x509.Certificate],
    csr_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    crl_policy: CrlPolicy = CrlPolicy.IF_PRESENT,
) -> AttestedKey:
    """Chain attestation cert -> F9 cert -> card-manufacturer CA; attested key == csr_key.

    Both certificates are DER. Raises :class:`AttestationRefused` naming the failed check.
    """
    attestation = load_certificate(attestation_certificate, "card attestation certificate")
    f9 = load_certificate(attestation_intermediate, "card's attestation (F9) certificate")
    # The F9 certificate must be the leaf's direct issuer: the card signs with its F9 key, and
    # the binding below is that key. Anything above it must chain to the trust store.
    path = verify_chain(attestation, [f9], anchors, now=now, what="card attestation certificate")
    if len(path) < 3 or path[1] != f9:
        raise AttestationRefused(
            "the card attestation certificate is not signed by the card's attestation (F9) "
            "certificate sent with it: send the F9 certificate read from the same card "
            "(GET DATA 5FFF01)"
        )
    # The leaf is the card's own statement (no CRL exists for it); the F9 certificate up are
    # the manufacturer's, and a revoked F9 certificate is a revoked card.
    revocation = check_revocation(
        path, crls, policy=crl_policy, now=now, what="card's attestation (F9) certificate", first=1
    )
    try:
        attested = attestation.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. a point not on its curve
        raise AttestationRefused(
            f"the card attested a key that cannot be read ({exc}); fleetgate device keys are "
            "ECDSA P-256"
        ) from exc
    if not isinstance(attested, ec.EllipticCurvePublicKey) or not isinstance(
        attested.curve, ec.SECP256R1
    ):
        raise AttestationRefused(
            f"the card attested a {type(attested).__name__} key; fleetgate device keys are "
            "ECDSA P-256: generate the slot 9A key with algorithm 11 (P-256)"
        )
    if _spki(attested) != _spki(csr_key):
        raise AttestationRefused(
            "the card attested a different key than the CSR's: build the CSR with the key "
            "generated in the attested slot, and attest after generating it"
        )
    return AttestedKey(
        protection=KeyProtection.SMARTCARD,
        public_key=attested,
        binding=key_fingerprint(f9),
        summary=(
            f"PIV card {describe(f9)}, attestation key issued by {f9.issuer.rfc4514_string()}"
        ),
        revocation=revocation,
    )


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
