"""Certificates issued from a template: the to-be-signed DER of one profile and issuer, built once
by cryptography, with only what differs per certificate spliced in.

cryptography's ``CertificateBuilder`` spends ~0.12 ms of a ~0.14 ms device certificate on
validating and encoding the same extensions every time; the ECDSA signature is the rest. A
:class:`CertificateTemplate` is made by building one certificate of the profile with
cryptography itself and cutting its TBSCertificate at the fields that vary: the serial number,
the validity, the subject's common name, the public key, its key identifier and the URIs of the
subject alternative name. Everything else (version, signature algorithm, issuer, the subject's
organisation, every other extension, their order and criticality) is the builder's own bytes.
Each certificate is then signed over the spliced DER with the CA key (through cryptography, or
the token for an external key) and parsed back by cryptography; the tests check that it is byte
for byte what the builder makes from the same inputs.

Only subjects with URIs and no DNS names or IP addresses (devices, stations) have a template;
:meth:`CertificateAuthority.issue <enrollment.ca.CertificateAuthority.issue>` builds the others.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enrollment import profiles
from enrollment.der import children, content, tlv

# The placeholder the template is built for: any valid values do, they are cut out again.
_PLACEHOLDER = profiles.Subject(common_name="template", uris=("urn:template",))
_SEQUENCE, _SET, _INTEGER, _OCTETS, _BIT_STRING = 0x30, 0x31, 0x02, 0x04, 0x03
_UTF8, _URI, _UTC_TIME, _GENERALIZED_TIME, _EXTENSIONS = 0x0C, 0x86, 0x17, 0x18, 0xA3
_OID = 0x06
_EPOCH = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
_COMMON_NAME = tlv(_OID, bytes.fromhex("550403"))  # id-at-commonName
_KEY_ID = tlv(_OID, bytes.fromhex("551d0e"))  # id-ce-subjectKeyIdentifier
_ALT_NAME = tlv(_OID, bytes.fromhex("551d11"))  # id-ce-subjectAltName


def templated(subject: profiles.Subject) -> bool:
    """Whether a template can issue for ``subject`` (else build with cryptography)."""
    return bool(subject.uris) and not subject.dns_names and not subject.ip_addresses


@dataclass(frozen=True)
class CertificateTemplate:
    """One profile's certificates from one issuer, as DER around the fields that vary.

    ``extensions`` are the builder's Extension elements in its order; the subject key
    identifier's and the subject alternative name's keep only their OID and criticality
    (what comes before the value), the value is spliced in per certificate.
    """

    issuer: profiles.Issuer
    version: bytes  # [0] EXPLICIT v3
    signature_algorithm: bytes  # AlgorithmIdentifier, inside the TBS and after it
    issuer_name: bytes
    subject_rdns: bytes  # the subject's RDNs before the common name (its organisation)
    extensions: tuple[bytes, ...]

    @classmethod
    def build(
        cls,
        profile: profiles.Profile,
        *,
        issuer: profiles.Issuer,
        pointers: profiles.RevocationPointers,
        policies: Sequence[x509.ObjectIdentifier] = (),
    ) -> CertificateTemplate:
        """Cut the template out of a certificate that cryptography builds and signs."""
        # Any time inside the issuer's validity: the sample's validity is cut out again.
        start = issuer.certificate.not_valid_before_utc if issuer.certificate else _EPOCH
        sample = profiles.build_certificate(
            profile,
            subject=_PLACEHOLDER,
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            issuer=issuer,
            validity=dt.timedelta(seconds=1),
            now=start + profiles.CLOCK_SKEW,
            serial=1,
            pointers=pointers,
            policies=policies,
        )
        tbs, algorithm, _signature = children(sample.public_bytes(Encoding.DER))
        version, _serial, inner_algorithm, issuer_name, _validity, subject, _key, exts = children(
            tbs
        )
        *organisation, common_name = children(subject)
        (extension_list,) = children(exts)
        extensions = tuple(_slot(ext) for ext in children(extension_list))
        if (
            inner_algorithm != algorithm
            or version[0] != 0xA0
            or exts[0] != _EXTENSIONS
            or _COMMON_NAME not in common_name
            or sorted(e[:5] for e in extensions if e[0] == _OID) != [_KEY_ID, _ALT_NAME]
        ):
            raise ValueError("cryptography's certificate is not laid out as the template expects")
        return cls(issuer, version, algorithm, issuer_name, b"".join(organisation), extensions)

    def issue(
        self,
        subject: profiles.Subject,
        public_key: ec.EllipticCurvePublicKey,
        *,
        serial: int,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> x509.Certificate:
        """The signed certificate, as :func:`profiles.build_certificate` would make it."""
        if not templated(subject) or serial <= 0:
            raise ValueError("a template issues only for URI subjects and positive serials")
        spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        _algorithm, bit_string = children(spki)
        # RFC 5280 4.2.1.2 method 1, as x509.SubjectKeyIdentifier.from_public_key computes it.
        key_id = hashlib.sha1(content(bit_string)[1:], usedforsecurity=False).digest()
        values = {
            _KEY_ID: tlv(_OCTETS, key_id),
            _ALT_NAME: tlv(_SEQUENCE, b"".join(tlv(_URI, uri.encode()) for uri in subject.uris)),
        }
        extensions = b"".join(
            tlv(_SEQUENCE, ext + tlv(_OCTETS, values[ext[:5]])) if ext[:5] in values else ext
            for ext in self.extensions
        )
        name = tlv(_UTF8, subject.common_name.encode())
        common_name = tlv(_SET, tlv(_SEQUENCE, _COMMON_NAME + name))
        tbs = tlv(
            _SEQUENCE,
            self.version
            + tlv(_INTEGER, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))
            + self.signature_algorithm
            + self.issuer_name
            + tlv(_SEQUENCE, _time(not_before) + _time(not_after))
            + tlv(_SEQUENCE, self.subject_rdns + common_name)
            + spki
            + tlv(_EXTENSIONS, tlv(_SEQUENCE, extensions)),
        )
        key = self.issuer.key
        signature = key.sign(tbs, ec.ECDSA(profiles.hash_for(key)))
        der = tlv(_SEQUENCE, tbs + self.signature_algorithm + tlv(_BIT_STRING, b"\0" + signature))
        return x509.load_der_x509_certificate(der)


def _slot(extension: bytes) -> bytes:
    """A fixed extension whole; for the subject key identifier and alternative name, only the
    elements before their value (the OID, and the criticality if present)."""
    parts = children(extension)
    if parts[0] in (_KEY_ID, _ALT_NAME):
        return b"".join(parts[:-1])
    return extension


def _time(when: dt.datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, UTC."""
    when = when.astimezone(dt.UTC)
    if when.year < 2050:
        return tlv(_UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(_GENERALIZED_TIME, when.strftime("%Y%m%d%H%M%SZ").encode())
