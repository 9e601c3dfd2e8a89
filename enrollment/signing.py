"""Signing certificates, CRLs and OCSP responses with a CA key that may live outside the process.

cryptography's builders sign only with its own key objects. A key in a PKCS#11 token
(:mod:`enrollment.pkcs11`) is an :class:`ExternalKey`: the builder signs with a throwaway key of
the same curve, which fixes every byte that is signed (the signature algorithm identifier inside
the to-be-signed part depends only on the curve's hash), and the outer signature is then replaced
by one the external key makes over those same bytes. The result is parsed again by cryptography,
and a test checks that it verifies under the external key's public key.

A file key (an ordinary ``ec.EllipticCurvePrivateKey``) is passed to the builder unchanged.
"""

from __future__ import annotations

import abc
import datetime
import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import Buffer
from cryptography.x509 import ocsp

from enrollment.der import children, content, tlv


class ExternalKey(ec.EllipticCurvePrivateKey, metaclass=abc.ABCMeta):
    """An EC private key whose secret half never enters the process: it can sign and name its
    public key, nothing else (no export, no key agreement)."""

    @abc.abstractmethod
    def sign_digest(self, digest: bytes) -> bytes:
        """A DER ECDSA signature (RFC 3279) of an already hashed message."""

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        algorithm = signature_algorithm.algorithm
        if not isinstance(signature_algorithm, ec.ECDSA) or not isinstance(
            algorithm, hashes.HashAlgorithm
        ):
            raise TypeError("an external CA key signs ECDSA with a named hash only")
        digest = hashes.Hash(algorithm)
        digest.update(bytes(data))
        return self.sign_digest(digest.finalize())

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse("key agreement")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse("export")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("export")

    def __copy__(self) -> ExternalKey:
        return self

    def __deepcopy__(self, memo: Any) -> ExternalKey:
        return self


def _refuse(what: str) -> NoReturn:
    raise TypeError(f"a CA key held in a token does not allow {what}")


SignatureHash = hashes.SHA256 | hashes.SHA384


def sign_certificate(
    builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, algorithm: SignatureHash
) -> x509.Certificate:
    def sign(signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return builder.sign(signer, algorithm)

    return _signed(sign, key, algorithm, x509.load_der_x509_certificate)


def sign_crl(
    builder: x509.CertificateRevocationListBuilder,
    key: ec.EllipticCurvePrivateKey,
    algorithm: SignatureHash,
) -> x509.CertificateRevocationList:
    def sign(signer: ec.EllipticCurvePrivateKey) -> x509.CertificateRevocationList:
        return builder.sign(signer, algorithm)

    return _signed(sign, key, algorithm, x509.load_der_x509_crl)


_Signed = TypeVar("_Signed", x509.Certificate, x509.CertificateRevocationList)


def _signed(
    sign: Callable[[ec.EllipticCurvePrivateKey], _Signed],
    key: ec.EllipticCurvePrivateKey,
    algorithm: SignatureHash,
    load: Callable[[bytes], _Signed],
) -> _Signed:
    """``sign(key)``; for an external key, signed by a stand-in and then re-signed."""
    if not isinstance(key, ExternalKey):
        return sign(key)
    draft = sign(_stand_in(key.curve.name))
    return load(_resign(draft.public_bytes(serialization.Encoding.DER), key, algorithm))


def sign_ocsp(
    builder: ocsp.OCSPResponseBuilder,
    responder: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    algorithm: SignatureHash,
) -> bytes:
    """A DER OCSPResponse (RFC 6960 4.2.1) with the responder named by its key hash; for an
    external key, the BasicOCSPResponse inside is what is re-signed. cryptography insists that
    the responder certificate match the signing key, so the draft names a stand-in certificate
    and its key hash (20 random-looking bytes) is replaced by the responder's own."""
    if not isinstance(key, ExternalKey):
        signed = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder).sign(
            key, algorithm
        )
        return signed.public_bytes(serialization.Encoding.DER)
    stand_in = _stand_in(key.curve.name)
    draft = (
        builder.responder_id(ocsp.OCSPResponderEncoding.HASH, _stand_in_certificate(stand_in))
        .sign(stand_in, algorithm)
        .public_bytes(serialization.Encoding.DER)
    )
    stand_in_hash = _key_hash(stand_in.public_key())
    assert draft.count(stand_in_hash) == 1
    draft = draft.replace(stand_in_hash, _key_hash(key.public_key()))
    # OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED,
    #   responseBytes [0] EXPLICIT SEQUENCE { responseType OID, response OCTET STRING } }
    status, explicit = children(draft)
    (response_bytes,) = children(explicit)
    response_type, octets = children(response_bytes)
    basic = _resign(content(octets), key, algorithm)
    response_bytes = tlv(0x30, response_type + tlv(0x04, basic))
    der = tlv(0x30, status + tlv(0xA0, response_bytes))
    ocsp.load_der_ocsp_response(der)  # it must still parse
    return der


def _key_hash(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """ResponderID byKey: SHA-1 of the subjectPublicKey bits (RFC 6960 4.2.1)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


@functools.cache
def _stand_in_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@functools.cache
def _stand_in(curve_name: str) -> ec.EllipticCurvePrivateKey:
    """A key of the curve whose signature is thrown away: only its algorithm identifier stays."""
    curves: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}
    return ec.generate_private_key(curves[curve_name])


def _resign(signed: bytes, key: ExternalKey, algorithm: SignatureHash) -> bytes:
    """SEQUENCE { tbs, algorithm, BIT STRING signature } with the signature replaced."""
    tbs, algorithm_id, _old, *more = children(signed)
    rest = b"".join(more)  # an OCSP response's [0] certs, if any
    signature = key.sign(tbs, ec.ECDSA(algorithm))
    return tlv(0x30, tbs + algorithm_id + tlv(0x03, b"\x00" + signature) + rest)
