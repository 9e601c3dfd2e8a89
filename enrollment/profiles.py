"""Certificate profiles (RFC 5280) as data, and one pure function that applies them.

A profile says what a certificate of one kind looks like: CA or not, key usages, extended key
usages, lifetime. :func:`build_certificate` turns a profile, a subject and an issuer into a signed
certificate; it does no I/O, so every profile is testable on its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enrollment.signing import sign_certificate

# Backdating absorbs clock skew between the CA and devices fresh off the line.
CLOCK_SKEW = dt.timedelta(minutes=5)

CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


# Certificate policies (RFC 5280 4.2.1.4) that record how a device key was proven to be held:
# generated in a TPM (TPM2_Certify + credential activation) or on a smartcard (card attestation).
# fleetgate's arc is a UUID OID (ITU-T X.667, 2.25.<uuid>): globally unique, no registry needed.
FLEETGATE_OID_ARC = "2.25.230117198723474299173587402156458684374"
TPM_KEY_POLICY = x509.ObjectIdentifier(f"{FLEETGATE_OID_ARC}.1.1")
SMARTCARD_KEY_POLICY = x509.ObjectIdentifier(f"{FLEETGATE_OID_ARC}.1.2")
KEY_PROTECTION_POLICIES = {"tpm": TPM_KEY_POLICY, "smartcard": SMARTCARD_KEY_POLICY}


def key_protection_of(cert: x509.Certificate) -> str:
    """The key protection a fleetgate certificate records ("software" when it records none)."""
    try:
        policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return "software"
    found = {p.policy_identifier for p in policies}
    for name, oid in KEY_PROTECTION_POLICIES.items():
        if oid in found:
            return name
    return "software"


@dataclass(frozen=True)
class Profile:
    """The shape of one kind of certificate."""

    name: str
    is_ca: bool
    path_length: int | None = None
    key_cert_sign: bool = False
    digital_signature: bool = False
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = ()


ROOT = Profile("root", is_ca=True, path_length=1, key_cert_sign=True)
ISSUING = Profile("issuing", is_ca=True, path_length=0, key_cert_sign=True)
DEVICE = Profile(
    "device",
    is_ca=False,
    digital_signature=True,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)
STATION = Profile(
    "station",
    is_ca=False,
    digital_signature=True,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)
SERVER = Profile(
    "server",
    is_ca=False,
    digital_signature=True,
    extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
)
# A broker node's client certificate for its NATS connection (issue 12): not a device, so the
# registry has no row for it and the MQTT broker admits no one with it.
FABRIC_NODE = Profile(
    "fabric-node",
    is_ca=False,
    digital_signature=True,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)


@dataclass(frozen=True)
class Issuer:
    """The certificate and key that sign; a self-signed root passes ``certificate=None``."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate | None


@dataclass(frozen=True)
class Subject:
    """Who a certificate names: a common name and its subject alternative names."""

    common_name: str
    uris: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    organization: str = "fleetgate"

    def name(self) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                x509.NameAttribute(NameOID.COMMON_NAME, self.common_name),
            ]
        )

    def general_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.DNSName(d) for d in self.dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in self.ip_addresses]
        return names


@dataclass(frozen=True)
class RevocationPointers:
    """Where relying parties find revocation status (CRL distribution point, OCSP)."""

    crl_url: str = ""
    ocsp_url: str = ""


def server_subject(names: Sequence[str]) -> Subject:
    """A server subject from a mix of DNS names and IP literals."""
    ips, dns = [], []
    for name in names:
        try:
            ipaddress.ip_address(name)
            ips.append(name)
        except ValueError:
            dns.append(name)
    return Subject(common_name=names[0], dns_names=tuple(dns), ip_addresses=tuple(ips))


def build_certificate(
    profile: Profile,
    *,
    subject: Subject,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer,
    validity: dt.timedelta,
    now: dt.datetime,
    serial: int | None = None,
    pointers: RevocationPointers = RevocationPointers(),
    policies: Sequence[x509.ObjectIdentifier] = (),
) -> x509.Certificate:
    """Sign a certificate of ``profile`` for ``subject``; pure apart from the random serial."""
    issuer_name = issuer.certificate.subject if issuer.certificate else subject.name()
    not_before, not_after = validity_window(issuer, now, validity)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject.name())
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_length), critical=True
        )
        .add_extension(_key_usage(profile), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    authority_key = issuer.key.public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key), critical=False
    )
    if profile.extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False
        )
    general_names = subject.general_names()
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    if policies:
        builder = builder.add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(oid, None) for oid in policies]),
            critical=False,
        )
    if not profile.is_ca:
        builder = _add_revocation_pointers(builder, pointers)
    return sign_certificate(builder, issuer.key, hash_for(issuer.key))


def validity_window(
    issuer: Issuer, now: dt.datetime, validity: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) of a certificate issued ``now``: backdated by the clock skew,
    and never outliving the CA that vouches for it."""
    not_after = now + validity
    if issuer.certificate is not None:
        not_after = min(not_after, issuer.certificate.not_valid_after_utc)
    return now - CLOCK_SKEW, not_after


def _key_usage(profile: Profile) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=profile.digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=profile.key_cert_sign,
        crl_sign=profile.key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _add_revocation_pointers(
    builder: x509.CertificateBuilder, pointers: RevocationPointers
) -> x509.CertificateBuilder:
    if pointers.crl_url:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(pointers.crl_url)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    if pointers.ocsp_url:
        access = x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP,
            x509.UniformResourceIdentifier(pointers.ocsp_url),
        )
        builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    return builder


def hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for a P-384 signer, SHA-256 otherwise (RFC 5480 section 4)."""
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
