"""TPM evidence made in software with the fuzz PKI's keys: what a TPM would send, minus the TPM.

For the seed corpus (a verifying Certify, an EK certificate) and for the TPM target's re-signing
mode, which signs a mutated certify statement with the AK so that the fuzzer reaches the checks
after the signature.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMS_CERTIFY_INFO,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from fuzz import pki

KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)
AK_ATTRIBUTES = KEY_ATTRIBUTES | TPMA_OBJECT.RESTRICTED


def public_area(label: str, attributes: int) -> Any:
    pem = pki.key(label).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return TPM2B_PUBLIC.from_pem(pem, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)


def ak_public() -> bytes:
    return bytes(public_area(pki.TPM_AK, AK_ATTRIBUTES).marshal())


def key_public() -> bytes:
    return bytes(public_area(pki.DEVICE, KEY_ATTRIBUTES).marshal())


def certify_info(key: Any, nonce: bytes = pki.NONCE) -> bytes:
    """A TPMS_ATTEST of type Certify about ``key`` (a TPM2B_PUBLIC) over ``nonce``."""
    attest = TPMS_ATTEST(
        magic=TPM2_GENERATED.VALUE,
        type=TPM2_ST.ATTEST_CERTIFY,
        extraData=nonce,
        attested=TPMU_ATTEST(certify=TPMS_CERTIFY_INFO(name=key.get_name())),
    )
    return bytes(attest.marshal())


def with_name(info: bytes, key_public: bytes) -> bytes:
    """``info`` re-marshalled to certify the key in ``key_public``, if both parse at all."""
    try:
        key = TPM2B_PUBLIC.unmarshal(key_public)[0]
        attest, _ = TPMS_ATTEST.unmarshal(info)
        attest.attested.certify.name = key.get_name()
        return bytes(attest.marshal())
    except Exception:  # not a public area or a TPMS_ATTEST: the verifier says so itself
        return info


def ak_signature(data: bytes) -> bytes:
    """TPMT_SIGNATURE (ECDSA, SHA-256) of ``data`` by the fuzz AK."""
    r, s = pki.sign_rs(pki.TPM_AK, data)
    signature = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.ECDSA,
        signature=TPMU_SIGNATURE(
            ecdsa=TPMS_SIGNATURE_ECC(
                hash=TPM2_ALG.SHA256,
                signatureR=r.to_bytes(32, "big"),
                signatureS=s.to_bytes(32, "big"),
            )
        ),
    )
    return bytes(signature.marshal())
