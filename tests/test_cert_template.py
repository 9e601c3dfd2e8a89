"""Templated certificates are the certificates cryptography's builder makes, byte for byte.

Each case issues from a :class:`CertificateTemplate` and builds with
:func:`profiles.build_certificate` from the same inputs (key, serial, time), then compares the
two TBSCertificates; the templated certificate must also parse, verify under its issuing CA
with cryptography and with ``openssl verify``, and carry what it was issued for.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enrollment import profiles
from enrollment.cert_template import CertificateTemplate, templated
from enrollment.der import children

NOW = dt.datetime(2026, 12, 7, 13, 45, 12, 345678, tzinfo=dt.UTC)
POINTERS = profiles.RevocationPointers(
    crl_url="http://ca.fleet.example/crl/" + "x" * 120,  # long: multi-byte DER lengths
    ocsp_url="http://ca.fleet.example/ocsp",
)


def issuing_ca(curve: ec.EllipticCurve, years: int = 40) -> profiles.Issuer:
    root_key = ec.generate_private_key(curve)
    key = ec.generate_private_key(curve)
    root = profiles.Issuer(root_key, None)
    cert = profiles.build_certificate(
        profiles.ISSUING,
        subject=profiles.Subject("template test CA"),
        public_key=key.public_key(),
        issuer=root,
        validity=dt.timedelta(days=365 * years),
        now=NOW,
    )
    return profiles.Issuer(key, cert)


@pytest.fixture(scope="module")
def issuer() -> profiles.Issuer:
    return issuing_ca(ec.SECP256R1())


def both(
    issuer: profiles.Issuer,
    profile: profiles.Profile,
    subject: profiles.Subject,
    *,
    serial: int,
    now: dt.datetime = NOW,
    validity: dt.timedelta = dt.timedelta(days=365),
    pointers: profiles.RevocationPointers = POINTERS,
    policies: tuple[x509.ObjectIdentifier, ...] = (),
) -> tuple[x509.Certificate, x509.Certificate]:
    """(templated, built) for the same key, serial and time."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    template = CertificateTemplate.build(
        profile, issuer=issuer, pointers=pointers, policies=policies
    )
    not_before, not_after = profiles.validity_window(issuer, now, validity)
    templated_cert = template.issue(
        subject, key, serial=serial, not_before=not_before, not_after=not_after
    )
    built = profiles.build_certificate(
        profile,
        subject=subject,
        public_key=key,
        issuer=issuer,
        validity=validity,
        now=now,
        serial=serial,
        pointers=pointers,
        policies=policies,
    )
    return templated_cert, built


def tbs(cert: x509.Certificate) -> bytes:
    return children(cert.public_bytes(Encoding.DER))[0]


def device(device_id: str) -> profiles.Subject:
    return profiles.Subject(device_id, uris=(f"urn:fleetgate:device:{device_id}",))


@pytest.mark.parametrize(
    ("profile", "policies"),
    [
        (profiles.DEVICE, ()),
        (profiles.DEVICE, (profiles.TPM_KEY_POLICY,)),
        (profiles.DEVICE, (profiles.SMARTCARD_KEY_POLICY,)),
        (profiles.STATION, ()),
    ],
)
@pytest.mark.parametrize("serial", [1, 0x80, 0x7F << 152, (1 << 159) - 1])
def test_a_templated_certificate_is_the_builders_byte_for_byte(issuer, profile, policies, serial):
    made, built = both(issuer, profile, device("sensor-17"), serial=serial, policies=policies)

    assert tbs(made) == tbs(built)
    assert made.serial_number == serial
    made.verify_directly_issued_by(issuer.certificate)


def test_validity_is_whole_seconds_backdated_and_switches_to_generalized_time_in_2050(issuer):
    late = dt.datetime(2049, 12, 31, 23, 0, 0, tzinfo=dt.UTC)
    made, built = both(
        issuer,
        profiles.DEVICE,
        device("sensor-1"),
        serial=7,
        now=late,
        validity=dt.timedelta(days=2),
    )

    assert tbs(made) == tbs(built)
    assert made.not_valid_before_utc == late - profiles.CLOCK_SKEW
    assert made.not_valid_after_utc == dt.datetime(2050, 1, 2, 23, 0, 0, tzinfo=dt.UTC)


def test_a_certificate_never_outlives_its_issuing_ca():
    short = issuing_ca(ec.SECP256R1(), years=1)
    made, built = both(
        short, profiles.DEVICE, device("sensor-1"), serial=9, validity=dt.timedelta(days=3650)
    )

    assert tbs(made) == tbs(built)
    assert made.not_valid_after_utc == short.certificate.not_valid_after_utc


def test_a_p384_issuing_ca_signs_with_sha384():
    p384 = issuing_ca(ec.SECP384R1())
    made, built = both(p384, profiles.DEVICE, device("sensor-1"), serial=11)

    assert tbs(made) == tbs(built)
    assert isinstance(made.signature_hash_algorithm, hashes.SHA384)
    made.verify_directly_issued_by(p384.certificate)


def test_without_revocation_pointers_and_with_several_uris(issuer):
    subject = profiles.Subject("sensor-1", uris=("urn:fleetgate:device:sensor-1", "urn:other:1"))
    made, built = both(
        issuer, profiles.DEVICE, subject, serial=13, pointers=profiles.RevocationPointers()
    )

    assert tbs(made) == tbs(built)


def test_the_certificate_names_its_subject_and_key_and_openssl_verifies_it(issuer, tmp_path: Path):
    made, _ = both(issuer, profiles.DEVICE, device("sensor-42"), serial=0xABCDEF)

    (cn,) = made.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "sensor-42"
    san = made.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetgate:device:sensor-42"
    ]
    ski = made.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(made.public_key())
    assert issuer.certificate is not None
    chain = tmp_path / "ca.pem"
    chain.write_bytes(issuer.certificate.public_bytes(Encoding.PEM))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(made.public_bytes(Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-partial_chain", "-CAfile", str(chain), str(leaf)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr


def test_subjects_with_dns_names_or_addresses_are_left_to_the_builder(issuer):
    assert templated(device("sensor-1"))
    assert not templated(profiles.server_subject(["localhost", "127.0.0.1"]))
    assert not templated(profiles.Subject("no-san"))
    template = CertificateTemplate.build(profiles.DEVICE, issuer=issuer, pointers=POINTERS)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValueError, match="URI subjects"):
        template.issue(
            profiles.server_subject(["localhost"]), key, serial=1, not_before=NOW, not_after=NOW
        )
