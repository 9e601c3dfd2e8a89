"""Certificate profiles: what each kind of certificate says, and that openssl agrees with it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from enrollment import profiles
from enrollment.ca import init_ca, load_ca
from enrollment.profiles import (
    CLOCK_SKEW,
    DEVICE,
    ISSUING,
    ROOT,
    SERVER,
    STATION,
    Issuer,
    RevocationPointers,
    Subject,
    build_certificate,
    server_subject,
)
from fleetgate.config import load_config

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
POINTERS = RevocationPointers(crl_url="https://ca.example/crl", ocsp_url="https://ca.example/ocsp")
LEAVES = {"device": DEVICE, "station": STATION, "server": SERVER}


class Chain:
    """A root, an issuing CA under it and a key to give leaves, built in memory."""

    def __init__(self, root_curve: ec.EllipticCurve = ec.SECP256R1(), issuing_days: int = 1825):
        self.root_key = ec.generate_private_key(root_curve)
        self.root = build_certificate(
            ROOT,
            subject=Subject("test root"),
            public_key=self.root_key.public_key(),
            issuer=Issuer(self.root_key, None),
            validity=dt.timedelta(days=7300),
            now=NOW,
            pointers=POINTERS,
        )
        self.issuing_key = ec.generate_private_key(ec.SECP256R1())
        self.issuing = build_certificate(
            ISSUING,
            subject=Subject("test issuing"),
            public_key=self.issuing_key.public_key(),
            issuer=Issuer(self.root_key, self.root),
            validity=dt.timedelta(days=issuing_days),
            now=NOW,
            pointers=POINTERS,
        )

    def leaf(
        self,
        profile: profiles.Profile,
        *,
        validity: dt.timedelta = dt.timedelta(days=90),
        pointers: RevocationPointers = POINTERS,
        serial: int | None = None,
        subject: Subject | None = None,
    ) -> x509.Certificate:
        return build_certificate(
            profile,
            subject=subject or Subject("sensor-1", uris=("urn:fleetgate:device:sensor-1",)),
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            issuer=Issuer(self.issuing_key, self.issuing),
            validity=validity,
            now=NOW,
            serial=serial,
            pointers=pointers,
        )

    def by_name(self, name: str) -> x509.Certificate:
        if name == "root":
            return self.root
        if name == "issuing":
            return self.issuing
        return self.leaf(LEAVES[name])


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain()


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension:
    return cert.extensions.get_extension_for_oid(oid)


def _has(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return False
    return True


# -- basic constraints and key usage --------------------------------------------------------


@pytest.mark.parametrize(("name", "path_length"), [("root", 1), ("issuing", 0)])
def test_ca_certificates_are_critical_cas_with_their_path_length(chain, name, path_length):
    ext = _ext(chain.by_name(name), ExtensionOID.BASIC_CONSTRAINTS)
    assert ext.critical is True
    assert ext.value.ca is True
    assert ext.value.path_length == path_length


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_certificates_are_critically_not_cas(chain, name):
    ext = _ext(chain.by_name(name), ExtensionOID.BASIC_CONSTRAINTS)
    assert ext.critical is True
    assert ext.value.ca is False
    assert ext.value.path_length is None


@pytest.mark.parametrize("name", ["root", "issuing"])
def test_ca_key_usage_is_critical_cert_and_crl_signing_only(chain, name):
    ext = _ext(chain.by_name(name), ExtensionOID.KEY_USAGE)
    assert ext.critical is True
    usage = ext.value
    assert usage.key_cert_sign is True
    assert usage.crl_sign is True
    assert usage.digital_signature is False
    assert usage.key_encipherment is False
    assert usage.content_commitment is False


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_key_usage_is_critical_digital_signature_only(chain, name):
    ext = _ext(chain.by_name(name), ExtensionOID.KEY_USAGE)
    assert ext.critical is True
    usage = ext.value
    assert usage.digital_signature is True
    assert usage.key_cert_sign is False
    assert usage.crl_sign is False
    assert usage.key_encipherment is False
    assert usage.key_agreement is False


# -- extended key usage ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("device", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("station", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
    ],
)
def test_each_leaf_carries_exactly_its_extended_key_usage(chain, name, usage):
    ext = _ext(chain.by_name(name), ExtensionOID.EXTENDED_KEY_USAGE)
    assert list(ext.value) == [usage]


@pytest.mark.parametrize("name", ["root", "issuing"])
def test_ca_certificates_carry_no_extended_key_usage(chain, name):
    assert not _has(chain.by_name(name), ExtensionOID.EXTENDED_KEY_USAGE)


# -- names and key identifiers ---------------------------------------------------------------


def test_the_root_is_self_issued_and_self_signed(chain):
    assert chain.root.issuer == chain.root.subject
    chain.root.verify_directly_issued_by(chain.root)


def test_each_certificate_is_signed_by_its_parent_and_names_it_as_issuer(chain):
    chain.issuing.verify_directly_issued_by(chain.root)
    leaf = chain.leaf(DEVICE)
    leaf.verify_directly_issued_by(chain.issuing)
    assert chain.issuing.issuer == chain.root.subject
    assert leaf.issuer == chain.issuing.subject
    with pytest.raises(ValueError):
        leaf.verify_directly_issued_by(chain.root)


def test_subject_key_identifier_is_derived_from_the_subject_key(chain):
    for cert in (chain.root, chain.issuing, chain.leaf(DEVICE)):
        ski = _ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
        assert ski.critical is False
        expected = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        assert ski.value.digest == expected.digest


def test_authority_key_identifier_links_each_child_to_its_parent(chain):
    leaf = chain.leaf(STATION)
    for child, parent in (
        (chain.root, chain.root),
        (chain.issuing, chain.root),
        (leaf, chain.issuing),
    ):
        aki = _ext(child, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
        parent_ski = _ext(parent, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
        assert aki.key_identifier == parent_ski.digest
    # and not to anyone else
    leaf_aki = _ext(leaf, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    root_ski = _ext(chain.root, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert leaf_aki.key_identifier != root_ski.digest


def test_the_subject_holds_organization_and_cn_and_the_san_holds_the_device_uri(chain):
    cert = chain.leaf(DEVICE)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "fleetgate"
    san = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetgate:device:sensor-1"
    ]


def test_a_subject_without_alternative_names_gets_no_san_extension(chain):
    assert not _has(chain.root, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)


def test_server_subject_splits_dns_names_from_ip_literals(chain):
    subject = server_subject(["broker.local", "127.0.0.1", "::1", "localhost"])
    assert subject.common_name == "broker.local"
    assert subject.dns_names == ("broker.local", "localhost")
    assert subject.ip_addresses == ("127.0.0.1", "::1")
    san = _ext(chain.leaf(SERVER, subject=subject), ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


# -- validity --------------------------------------------------------------------------------


def test_validity_starts_backdated_by_the_clock_skew_and_lasts_the_requested_time(chain):
    cert = chain.leaf(DEVICE, validity=dt.timedelta(days=90))
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=90)


def test_a_device_certificate_never_outlives_its_issuing_ca():
    short = Chain(issuing_days=30)
    cert = short.leaf(DEVICE, validity=dt.timedelta(days=90))
    assert cert.not_valid_after_utc == short.issuing.not_valid_after_utc
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=30)


def test_the_issuing_ca_never_outlives_the_root():
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_certificate(
        ROOT,
        subject=Subject("short root"),
        public_key=root_key.public_key(),
        issuer=Issuer(root_key, None),
        validity=dt.timedelta(days=10),
        now=NOW,
    )
    issuing = build_certificate(
        ISSUING,
        subject=Subject("long issuing"),
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        issuer=Issuer(root_key, root),
        validity=dt.timedelta(days=1000),
        now=NOW,
    )
    assert issuing.not_valid_after_utc == root.not_valid_after_utc


# -- revocation pointers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaves_point_to_the_crl_and_the_ocsp_responder(chain, name):
    cert = chain.by_name(name)
    crl_dp = _ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    assert [n.value for point in crl_dp for n in point.full_name] == [POINTERS.crl_url]
    aia = _ext(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    assert [(a.access_method, a.access_location.value) for a in aia] == [
        (x509.oid.AuthorityInformationAccessOID.OCSP, POINTERS.ocsp_url)
    ]


@pytest.mark.parametrize("name", ["root", "issuing"])
def test_ca_certificates_carry_no_revocation_pointers_even_when_given(chain, name):
    cert = chain.by_name(name)  # built with POINTERS
    assert not _has(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS)
    assert not _has(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS)


def test_empty_pointers_leave_the_extensions_out(chain):
    cert = chain.leaf(DEVICE, pointers=RevocationPointers())
    assert not _has(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS)
    assert not _has(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS)


# -- serials and signature algorithms ----------------------------------------------------------


def test_serials_are_random_positive_and_at_least_64_bits(chain):
    serials = [chain.leaf(DEVICE).serial_number for _ in range(8)]
    assert len(set(serials)) == len(serials)
    assert all(s > 0 for s in serials)
    # 159 random bits; all eight falling under 2**64 by chance is not a real possibility.
    assert max(s.bit_length() for s in serials) > 64
    assert all(s.bit_length() <= 159 for s in serials)  # fits in 20 octets, RFC 5280 4.1.2.2


def test_an_explicit_serial_is_used_as_given(chain):
    assert chain.leaf(DEVICE, serial=0x1234567890ABCDEF01).serial_number == 0x1234567890ABCDEF01


def test_a_p384_root_signs_with_sha384_and_a_p256_signer_with_sha256():
    strong = Chain(root_curve=ec.SECP384R1())
    assert isinstance(strong.root.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(strong.issuing.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(strong.leaf(DEVICE).signature_hash_algorithm, hashes.SHA256)
    weak = Chain()
    assert isinstance(weak.root.signature_hash_algorithm, hashes.SHA256)
    strong.issuing.verify_directly_issued_by(strong.root)


# -- openssl agrees ----------------------------------------------------------------------------


def _openssl_verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _write(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    return path


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_openssl_verifies_the_chain_init_ca_writes(home, tmp_path, curve):
    config = load_config(home)
    init_ca(config, curve=curve)
    ca_dir = config.ca_dir
    result = _openssl_verify("-CAfile", ca_dir / "root.crt", ca_dir / "issuing.crt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "issuing.crt: OK" in result.stdout

    ca = load_ca(config)
    key = ec.generate_private_key(ec.SECP256R1())
    device = ca.issue(
        DEVICE,
        Subject("sensor-1", uris=("urn:fleetgate:device:sensor-1",)),
        key.public_key(),
        dt.timedelta(days=90),
    )
    leaf = _write(tmp_path / "device.pem", device)
    verify_leaf = ("-CAfile", ca_dir / "root.crt", "-untrusted", ca_dir / "issuing.crt")
    result = _openssl_verify("-purpose", "sslclient", *verify_leaf, leaf)
    assert result.returncode == 0, result.stdout + result.stderr
    # a device certificate is a client certificate, never a server one
    assert _openssl_verify("-purpose", "sslserver", *verify_leaf, leaf).returncode != 0
    # and without the issuing CA there is no path to the root
    assert _openssl_verify("-CAfile", ca_dir / "root.crt", leaf).returncode != 0

    server = x509.load_pem_x509_certificates((ca_dir / "server.crt").read_bytes())[0]
    server_pem = _write(tmp_path / "server.pem", server)
    result = _openssl_verify("-purpose", "sslserver", *verify_leaf, server_pem)
    assert result.returncode == 0, result.stdout + result.stderr


def test_openssl_refuses_a_ca_below_the_issuing_ca_because_path_length_is_zero(tmp_path, chain):
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = build_certificate(
        ISSUING,
        subject=Subject("rogue sub-CA"),
        public_key=rogue_key.public_key(),
        issuer=Issuer(chain.issuing_key, chain.issuing),
        validity=dt.timedelta(days=30),
        now=NOW,
    )
    leaf = build_certificate(
        DEVICE,
        subject=Subject("sensor-1"),
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        issuer=Issuer(rogue_key, rogue),
        validity=dt.timedelta(days=1),
        now=NOW,
    )
    root = _write(tmp_path / "root.pem", chain.root)
    untrusted = _write(tmp_path / "untrusted.pem", chain.issuing, rogue)
    result = _openssl_verify(
        "-attime",
        str(int(NOW.timestamp())),
        "-CAfile",
        root,
        "-untrusted",
        untrusted,
        _write(tmp_path / "leaf.pem", leaf),
    )
    assert result.returncode != 0
    assert "path length" in (result.stdout + result.stderr).lower()
