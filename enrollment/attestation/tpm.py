"""TPM 2.0 attestation verifier: proof that a CSR's key was made in, and cannot leave, a TPM.

Two pure steps around the station's TPM work (no I/O; bytes and trust anchors in):

1. :func:`make_challenge` checks the EK certificate against the manufacturers' CAs and the
   offered attestation key (AK), then wraps a fresh secret to the EK for the AK's name
   (MakeCredential, in software). Only a TPM holding both that EK and an object with that
   name can unwrap it, so a correct answer ties the AK to the certified TPM.
2. :func:`verify_certify` checks the AK's ``TPM2_Certify`` of the device key: a restricted
   AK signs only structures the TPM made itself (they start with ``TPM_GENERATED_VALUE``), so
   the signed name and attributes are the TPM's own statement about a key it holds, and the
   nonce inside makes the statement fresh.

What they rest on: the TPM enforces that ``fixedTPM`` can be set only on a key it generated
under a ``fixedTPM`` parent and never duplicates such a key; the name (nameAlg || hash of the
public area) commits to the attributes. The service compares the activated secret (constant
time) and keeps each nonce single-use with a short TTL.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)
from tpm2_pytss.constants import (  # type: ignore[import-untyped]
    TPM2_ALG,
    TPM2_GENERATED,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped]
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF_OBJECT,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import make_credential  # type: ignore[import-untyped]

from enrollment.attestation.trust import (
    CrlPolicy,
    check_revocation,
    describe,
    key_fingerprint,
    load_certificate,
    verify_chain,
)
from fleetgate.errors import AttestationRefused

__all__ = ["NONCE_BYTES", "TpmChallenge", "make_challenge", "verify_certify"]

NONCE_BYTES = 32
SECRET_BYTES = 32

# A key the TPM generated (sensitiveDataOrigin) that can never leave it (fixedTPM) nor move to
# another parent (fixedParent), and that signs (sign) but does not decrypt.
_REQUIRED_KEY_ATTRIBUTES = {
    TPMA_OBJECT.FIXEDTPM: "fixedTPM",
    TPMA_OBJECT.FIXEDPARENT: "fixedParent",
    TPMA_OBJECT.SENSITIVEDATAORIGIN: "sensitiveDataOrigin",
    TPMA_OBJECT.SIGN_ENCRYPT: "sign",
}
_REQUIRED_AK_ATTRIBUTES = {**_REQUIRED_KEY_ATTRIBUTES, TPMA_OBJECT.RESTRICTED: "restricted"}
_STRONG_NAME_ALGS = {TPM2_ALG.SHA256, TPM2_ALG.SHA384, TPM2_ALG.SHA512}


@dataclass(frozen=True)
class TpmChallenge:
    """What the service keeps (``secret``, ``nonce``) and sends (the rest) for one enrollment."""

    nonce: bytes  # NONCE_BYTES random bytes; Certify's qualifying data
    secret: bytes  # SECRET_BYTES random bytes wrapped to the EK (MakeCredential, AK's name)
    credential_blob: bytes  # marshalled TPM2B_ID_OBJECT
    encrypted_secret: bytes  # marshalled TPM2B_ENCRYPTED_SECRET
    ek_fingerprint: str  # trust.key_fingerprint of the EK certificate
    ek_summary: str  # e.g. "EK RSA-2048 issued by CN=swtpm-localca"
    revocation: str = ""  # trust.check_revocation's line for the audit trail


def make_challenge(
    *,
    ek_certificate: bytes,
    ek_chain: Sequence[bytes],
    ak_public: bytes,
    anchors: Sequence[x509.Certificate],
    now: dt.datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    crl_policy: CrlPolicy = CrlPolicy.IF_PRESENT,
) -> TpmChallenge:
    """Check the EK certificate chain (and its manufacturers' CRLs) and the AK; wrap a fresh
    secret to the EK for the AK."""
    ek_cert = load_certificate(ek_certificate, "EK certificate")
    chain = [load_certificate(der, "EK chain certificate") for der in ek_chain]
    path = verify_chain(ek_cert, chain, anchors, now=now, what="EK certificate")
    revocation = check_revocation(path, crls, policy=crl_policy, now=now, what="EK certificate")
    ak = _public_area(ak_public, "AK public area")
    _require_attributes(ak, _REQUIRED_AK_ATTRIBUTES, "attestation key")
    if ak.publicArea.objectAttributes & TPMA_OBJECT.DECRYPT:
        raise AttestationRefused("the attestation key has the decrypt attribute; an AK only signs")
    _require_strong_name(ak, "attestation key")
    ek_public, kind = _ek_public_area(ek_cert)
    secret = secrets.token_bytes(SECRET_BYTES)
    blob, encrypted = make_credential(ek_public, secret, ak.get_name())
    return TpmChallenge(
        nonce=secrets.token_bytes(NONCE_BYTES),
        secret=secret,
        credential_blob=blob.marshal(),
        encrypted_secret=encrypted.marshal(),
        ek_fingerprint=key_fingerprint(ek_cert),
        ek_summary=f"EK {kind} issued by {ek_cert.issuer.rfc4514_string() or describe(ek_cert)}",
        revocation=revocation,
    )


def verify_certify(
    *,
    ak_public: bytes,
    nonce: bytes,
    key_public: bytes,
    certify_info: bytes,
    certify_signature: bytes,
    csr_key: ec.EllipticCurvePublicKey,
) -> None:
    """The AK vouches, over ``nonce``, for the TPM-bound key that signed the CSR; else refuse."""
    ak = _public_area(ak_public, "AK public area")
    key = _public_area(key_public, "device key public area")
    try:
        signature, _ = TPMT_SIGNATURE.unmarshal(certify_signature)
        signature.verify_signature(ak, certify_info)
    except InvalidSignature:
        raise AttestationRefused(
            "the Certify signature does not verify with the challenged attestation key: it was "
            "signed by a different AK (or altered); certify with the AK the challenge was for"
        ) from None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise AttestationRefused(
            f"the Certify signature is malformed or unsupported ({exc})"
        ) from exc
    attest = _attestation(certify_info)
    if int(attest.magic) != int(TPM2_GENERATED.VALUE) or attest.type != TPM2_ST.ATTEST_CERTIFY:
        raise AttestationRefused(
            "certify_info is not a TPM-generated Certify statement "
            f"(magic 0x{int(attest.magic):08x}, type 0x{int(attest.type):04x})"
        )
    if not secrets.compare_digest(bytes(attest.extraData), nonce):
        raise AttestationRefused(
            "the Certify statement is not over this challenge's nonce: it is replayed or made "
            "for another challenge; request a new challenge and certify over its nonce"
        )
    _require_strong_name(key, "device key")  # before get_name, which knows only those
    if bytes(attest.attested.certify.name) != bytes(key.get_name()):
        raise AttestationRefused(
            "the Certify statement is about a different key than key_public: certify the key "
            "that signed the CSR"
        )
    _require_attributes(key, _REQUIRED_KEY_ATTRIBUTES, "device key")
    attributes = key.publicArea.objectAttributes
    if attributes & TPMA_OBJECT.DECRYPT:
        raise AttestationRefused("the device key has the decrypt attribute; it must only sign")
    if attributes & TPMA_OBJECT.RESTRICTED:
        raise AttestationRefused("the device key is restricted; it could not sign TLS handshakes")
    if _spki(_to_key(key)) != _spki(csr_key):
        raise AttestationRefused(
            "the certified TPM key is not the CSR's key: sign the CSR with the certified key"
        )


def _public_area(data: bytes, what: str) -> Any:
    try:
        public, used = TPM2B_PUBLIC.unmarshal(data)
    except Exception as exc:  # tss2's unmarshal raises TSS2_Exception, or cffi errors
        raise AttestationRefused(f"the {what} is not a marshalled TPM2B_PUBLIC ({exc})") from exc
    if used != len(data):
        raise AttestationRefused(f"the {what} has {len(data) - used} trailing bytes")
    return public


def _attestation(data: bytes) -> Any:
    try:
        attest, used = TPMS_ATTEST.unmarshal(data)
    except Exception as exc:  # as in _public_area
        raise AttestationRefused(f"certify_info is not a marshalled TPMS_ATTEST ({exc})") from exc
    if used != len(data):
        raise AttestationRefused(f"certify_info has {len(data) - used} trailing bytes")
    return attest


def _require_attributes(public: Any, required: dict[Any, str], what: str) -> None:
    attributes = public.publicArea.objectAttributes
    missing = [name for bit, name in required.items() if not attributes & bit]
    if missing:
        hint = (
            " (a key imported into the TPM, or made to be duplicable, lacks fixedTPM: it may "
            "exist outside this TPM)"
            if "fixedTPM" in missing
            else ""
        )
        raise AttestationRefused(f"the {what} lacks the attribute(s) {', '.join(missing)}{hint}")


def _require_strong_name(public: Any, what: str) -> None:
    if public.publicArea.nameAlg not in _STRONG_NAME_ALGS:
        raise AttestationRefused(
            f"the {what}'s name algorithm 0x{int(public.publicArea.nameAlg):04x} is not "
            "SHA-256/384/512; a weak name hash would let another public area pass for it"
        )


def _to_key(public: Any) -> Any:
    """The certified key as a cryptography key; a TPM can certify keys that are not one (an
    HMAC key) or, if it is not genuine, a point off its curve."""
    try:
        return load_pem_public_key(public.to_pem())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AttestationRefused(
            f"the certified TPM key is not a usable public key ({exc}): certify the ECDSA "
            "P-256 key that signed the CSR"
        ) from exc


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


# What MakeCredential needs of an EK (TCG EK Credential Profile 2.0, section 2.2.1): its name
# algorithm (the KDF and HMAC of the credential) and its symmetric cipher (AES-CFB). The templates
# differ in more (authPolicy, userWithAuth, unique), but those change the EK's own name, which
# MakeCredential does not use (it seals to the AK's name). Low range L-1 (RSA-2048) and L-2
# (P-256) and high range H-1 (RSA-2048) and H-2 (P-256) share SHA-256 / AES-128; H-3 (P-384),
# H-6 (RSA-3072) and H-7 (RSA-4096) use SHA-384 / AES-256; H-4 (P-521) SHA-512 / AES-256.
# H-5 (SM2) has no SM2/SM4 support in cryptography: refused.
_EK_PARAMETERS = {
    "RSA-2048": (TPM2_ALG.SHA256, 128),
    "RSA-3072": (TPM2_ALG.SHA384, 256),
    "RSA-4096": (TPM2_ALG.SHA384, 256),
    "ECC P-256": (TPM2_ALG.SHA256, 128),
    "ECC P-384": (TPM2_ALG.SHA384, 256),
    "ECC P-521": (TPM2_ALG.SHA512, 256),
}
_EK_CURVES = {"secp256r1": "ECC P-256", "secp384r1": "ECC P-384", "secp521r1": "ECC P-521"}


def _ek_public_area(cert: x509.Certificate) -> tuple[Any, str]:
    """The EK's public area as the TPM holds it, rebuilt from the certificate's key."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size in (2048, 3072, 4096):
        kind = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EK_CURVES:
        kind = _EK_CURVES[key.curve.name]
    else:
        raise AttestationRefused(
            f"the EK certificate's key ({type(key).__name__}) is not RSA-2048/3072/4096 or "
            "ECC P-256/384/521, the TCG EK types fleetgate can make a credential for"
        )
    name_alg, aes_bits = _EK_PARAMETERS[kind]
    symmetric = TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=aes_bits),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )
    area = TPMT_PUBLIC.from_pem(
        _spki(key),
        nameAlg=name_alg,
        objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT,
        symmetric=symmetric,
    )
    return area, kind
