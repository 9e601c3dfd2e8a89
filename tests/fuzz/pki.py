"""The fuzz targets' fixed trust material: keys derived from labels, certificates signed
deterministically, on a fixed clock.

Nothing here is random, so a corpus file replays to the same verdict on any machine and in any
year, and the harness can re-sign a mutated to-be-signed structure (:func:`signed`) to carry the
fuzzer past a signature check into the code behind it. These keys are test fixtures only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2046, 1, 1, tzinfo=dt.UTC)
NONCE = bytes(range(32))
"""The Certify nonce the TPM target's challenge carries."""

# AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758 section 3.2: no parameters).
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@cache
def key(label: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key derived from ``label``: the same key on every run."""
    digest = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big")
    return ec.derive_private_key(digest % (_ORDER - 1) + 1, ec.SECP256R1())


def sign(label: str, data: bytes) -> bytes:
    """ECDSA-SHA256 (RFC 6979, deterministic) by :func:`key` ``label``, DER-encoded."""
    return key(label).sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def sign_rs(label: str, data: bytes) -> tuple[int, int]:
    return decode_dss_signature(sign(label, data))


def _der_length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def signed(tbs: bytes, label: str) -> bytes:
    """``SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }``: the outer shape of both an
    X.509 certificate and a PKCS#10 request, whatever ``tbs`` holds, signed by ``label``'s key."""
    signature = _tlv(0x03, b"\x00" + sign(label, tbs))
    return _tlv(0x30, tbs + _ECDSA_SHA256 + signature)


def spki(label: str) -> bytes:
    return key(label).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate(
    subject: str,
    issuer: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
    *,
    ca: bool,
) -> x509.Certificate:
    """``subject`` (key :func:`key` ``subject`` unless given) issued by ``issuer``'s key."""
    return (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(public_key or key(subject).public_key())
        .serial_number(int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big"))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key(issuer), hashes.SHA256(), ecdsa_deterministic=True)
    )


# The hierarchies the targets trust. Device key: the CSR's, the card's 9A key, the TPM key.
DEVICE = "fuzz device key"
CARD_CA = "fuzz card maker"
CARD_F9 = "fuzz card F9"
TPM_CA = "fuzz TPM maker"
TPM_INTERMEDIATE = "fuzz TPM maker intermediate"
TPM_EK = "fuzz EK"
TPM_AK = "fuzz AK"


@cache
def card_anchors() -> tuple[x509.Certificate, ...]:
    return (certificate(CARD_CA, CARD_CA, ca=True),)


@cache
def tpm_anchors() -> tuple[x509.Certificate, ...]:
    return (certificate(TPM_CA, TPM_CA, ca=True),)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)
