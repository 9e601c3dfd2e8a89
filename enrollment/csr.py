"""Certificate signing requests: the wire format of RFC 7030 and the device key policy.

Pure functions: bytes in, a :class:`CheckedCSR` or a :class:`~fleetgate.errors.CSRRejected` out.
The CSR's self-signature is its proof of possession; the key must be ECDSA P-256 and the only
extension a device may request is a subject alternative name naming itself.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from fleetgate.errors import CSRRejected, InvalidDeviceId
from fleetgate.ids import DEVICE_URI_PREFIX, validate_id

ALLOWED_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384)
X509_PARSE_ERRORS = (
    ValueError,
    TypeError,  # a name attribute of a type its OID does not allow (a BIT STRING common name)
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
"""What cryptography raises for malformed DER in a certificate or CSR, as it loads it or first
reads its names and extensions (not all are ValueErrors)."""


@dataclass(frozen=True)
class CheckedCSR:
    """A CSR that passed every check, with the device id it names."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    csr: x509.CertificateSigningRequest


def decode_est_body(body: bytes) -> bytes:
    """DER from an EST request body: base64 (RFC 7030 section 4.2.1), or PEM for convenience."""
    text = body.strip()
    if not text:
        raise CSRRejected("the request body is empty: send a base64-encoded PKCS#10 CSR")
    if text.startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_csr(text).public_bytes(Encoding.DER)
        except X509_PARSE_ERRORS as exc:
            raise CSRRejected("the PEM body is not a valid PKCS#10 CSR") from exc
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CSRRejected(
            "the request body is not base64: EST (RFC 7030) wants the DER CSR base64-encoded"
        ) from exc


def check_device_csr(der: bytes) -> CheckedCSR:
    """Parse a DER CSR and enforce the device profile on it."""
    try:
        csr = x509.load_der_x509_csr(der)
        # Parsed on first use by cryptography: a malformed subject or extension is refused here.
        csr.subject, csr.extensions  # noqa: B018
    except X509_PARSE_ERRORS as exc:
        raise CSRRejected(
            f"the body is not a DER PKCS#10 certificate signing request ({exc})"
        ) from exc
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. a point not on its curve
        raise CSRRejected(
            f"the CSR's public key cannot be read ({exc}): device keys must be ECDSA P-256"
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        raise CSRRejected(
            f"the CSR holds an RSA-{key.key_size} key: device keys must be ECDSA P-256"
        )
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CSRRejected(f"the CSR holds a {type(key).__name__}: device keys must be ECDSA P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise CSRRejected(f"the CSR's key is on curve {key.curve.name}: device keys must be P-256")
    try:
        signature_hash = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:  # an OID cryptography does not know
        signature_hash = None
    if not isinstance(signature_hash, ALLOWED_SIGNATURE_HASHES):
        raise CSRRejected("the CSR must be signed with ECDSA and SHA-256 or SHA-384")
    if not csr.is_signature_valid:
        raise CSRRejected(
            "the CSR's signature does not verify: it was not signed by the key it holds "
            "(no proof of possession)"
        )
    device_id = _device_id(csr)
    _check_requested_extensions(csr, device_id)
    return CheckedCSR(device_id=device_id, public_key=key, csr=csr)


def _device_id(csr: x509.CertificateSigningRequest) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CSRRejected("the CSR subject must hold exactly one CN: the device id")
    value = names[0].value
    try:
        return validate_id(value if isinstance(value, str) else value.decode(errors="replace"))
    except InvalidDeviceId as exc:
        raise CSRRejected(f"the CSR subject CN is not a valid device id: {exc.message}") from exc


def _check_requested_extensions(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    """Only a SAN naming this very device may be requested; the CA decides everything else."""
    for ext in csr.extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            raise CSRRejected(
                f"the CSR requests extension {ext.oid.dotted_string} ({ext.oid._name}): "
                "devices may request only a subjectAltName; the CA sets the rest"
            )
        expected = x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)
        if list(ext.value) != [expected]:
            raise CSRRejected(
                f"the CSR's subjectAltName must be exactly the URI {expected.value} "
                f"(matching its CN); it asks for {[str(n.value) for n in ext.value]}"
            )
