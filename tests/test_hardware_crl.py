"""Manufacturer CRLs for EK and card attestation certificates, under each ``hardware_crl`` policy.

The TPM cases use a real swtpm EK certificate and CRLs signed by its manufacturer's real
issuing CA key (``swtpm_localca``'s); the card cases use software-made cards, as the pure
verifier tests do. One case goes through the EST service to show the refusal is audited.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from card_helpers import (
    PIN,
    CardHandle,
    card_fixture,
    card_maker_fixture,
    der,
    pcsc_fixture,
    software_card,
    trust_card_maker,
)
from conftest import Fleet, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from tpm_helpers import anchors, challenge_for, ek_chain, issuer_key

from device_sdk.errors import EnrollmentError
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from device_sdk.tpm import Tpm
from enrollment.attestation.piv import verify_piv_attestation
from enrollment.attestation.trust import CrlPolicy, load_crls, load_trust_store
from enrollment.registry import DeviceState
from firmware_sim.vtpm import TpmManufacturer, VirtualTpm
from fleetgate.config import load_config
from fleetgate.errors import AttestationRefused, ConfigError

__all__ = ["card_fixture", "card_maker_fixture", "pcsc_fixture"]


def _now() -> dt.datetime:
    """Each check's time: the evidence (swtpm, cards) is made as the tests run."""
    return dt.datetime.now(dt.UTC)


def crl(
    issuer: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    revoked: tuple[int, ...] = (),
    *,
    next_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(_now() - dt.timedelta(hours=2))
        .next_update(next_update or _now() + dt.timedelta(days=7))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_now() - dt.timedelta(minutes=30))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
    return builder.sign(key, hashes.SHA256())


# -- TPM: the EK certificate of a real swtpm -----------------------------------------------------


def _root_key(maker: TpmManufacturer) -> rsa.RSAPrivateKey:
    return _rsa_key(maker.directory / "swtpm-localca-rootca-privkey.pem")


def _rsa_key(path: Path) -> rsa.RSAPrivateKey:
    """swtpm_localca's keys: certtool's text dump, then the PEM."""
    text = path.read_bytes()
    key = serialization.load_pem_private_key(text[text.index(b"-----BEGIN") :], None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ek_evidence(vtpm: VirtualTpm) -> tuple[x509.Certificate, bytes]:
    with Tpm(vtpm.tcti) as chip:
        return chip.endorsement().x509(), chip.create_attestation_key().public


def challenge(
    maker: TpmManufacturer,
    evidence: tuple[x509.Certificate, bytes],
    crls: list[x509.CertificateRevocationList],
    policy: CrlPolicy,
) -> str:
    ek, ak_public = evidence
    made = challenge_for(maker, der(ek), ak_public, crls=crls, crl_policy=policy)
    return made.revocation


def test_a_revoked_ek_certificate_is_refused(tpm_maker, ek_evidence):
    issuer = ek_chain(tpm_maker)[0]
    revoked = crl(issuer, issuer_key(tpm_maker), (ek_evidence[0].serial_number,))
    for policy in (CrlPolicy.REQUIRE, CrlPolicy.IF_PRESENT):
        with pytest.raises(
            AttestationRefused, match=r"the EK certificate .* is revoked by .*\(keyCompromise\)"
        ):
            challenge(tpm_maker, ek_evidence, [revoked], policy)
    assert "not checked" in challenge(tpm_maker, ek_evidence, [revoked], CrlPolicy.IGNORE)


def test_a_clean_crl_passes_and_a_crl_from_a_namesake_ca_does_not_count(
    tpm_maker, foreign_vtpm, ek_evidence
):
    issuer, root = ek_chain(tpm_maker)[0], anchors(tpm_maker)[0]
    clean = crl(issuer, issuer_key(tpm_maker), (12345,))
    # Every swtpm_localca is "CN=swtpm-localca": a CRL signed by another one revokes nothing here.
    other = foreign_vtpm.manufacturer
    namesake = crl(ek_chain(other)[0], issuer_key(other), (ek_evidence[0].serial_number,))
    assert namesake.issuer == clean.issuer
    assert challenge(tpm_maker, ek_evidence, [clean, namesake], CrlPolicy.IF_PRESENT) == (
        f"no CRL in the trust store for {root.subject.rfc4514_string()} (hardware_crl = if-present)"
    )
    with pytest.raises(AttestationRefused, match=f"no CRL of {root.subject.rfc4514_string()}"):
        challenge(tpm_maker, ek_evidence, [clean, namesake], CrlPolicy.REQUIRE)
    root_key = _root_key(tpm_maker)
    assert (
        challenge(tpm_maker, ek_evidence, [clean, namesake, crl(root, root_key)], CrlPolicy.REQUIRE)
        == "not revoked per the manufacturers' CRLs"
    )


def test_missing_crl_under_each_policy_for_the_ek(tpm_maker, ek_evidence):
    with pytest.raises(AttestationRefused, match='hardware_crl = "require"'):
        challenge(tpm_maker, ek_evidence, [], CrlPolicy.REQUIRE)
    noted = challenge(tpm_maker, ek_evidence, [], CrlPolicy.IF_PRESENT)
    assert noted.startswith("no CRL in the trust store for CN=swtpm-localca")
    assert challenge(tpm_maker, ek_evidence, [], CrlPolicy.IGNORE).startswith(
        "revocation not checked"
    )


def test_a_stale_crl_is_refused_unless_ignored(tpm_maker, ek_evidence):
    stale = crl(
        ek_chain(tpm_maker)[0],
        issuer_key(tpm_maker),
        next_update=_now() - dt.timedelta(minutes=30),
    )
    for policy in (CrlPolicy.REQUIRE, CrlPolicy.IF_PRESENT):
        with pytest.raises(AttestationRefused, match=r"CRL of CN=swtpm-localca .* is stale"):
            challenge(tpm_maker, ek_evidence, [stale], policy)
    challenge(tpm_maker, ek_evidence, [stale], CrlPolicy.IGNORE)


# -- cards ---------------------------------------------------------------------------------------


def verify_card(card, crls, policy: CrlPolicy) -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return verify_piv_attestation(
        attestation_certificate=der(card.attest(key)),
        attestation_intermediate=der(card.f9),
        anchors=[card.ca],
        csr_key=key,
        now=_now(),
        crls=crls,
        crl_policy=policy,
    ).revocation


def test_a_revoked_card_attestation_certificate_is_refused():
    card, other = software_card(), software_card()
    revoked = crl(card.ca, card.ca_key, (card.f9.serial_number,))
    with pytest.raises(AttestationRefused, match=r"attestation \(F9\) certificate .* is revoked"):
        verify_card(card, [revoked], CrlPolicy.IF_PRESENT)
    assert verify_card(other, [revoked], CrlPolicy.IF_PRESENT).startswith("no CRL")
    clean = crl(card.ca, card.ca_key, (other.f9.serial_number,))
    assert (
        verify_card(card, [clean], CrlPolicy.REQUIRE) == "not revoked per the manufacturers' CRLs"
    )


def test_missing_and_stale_card_crls_under_each_policy():
    card = software_card()
    with pytest.raises(AttestationRefused, match="no CRL of CN=software maker"):
        verify_card(card, [], CrlPolicy.REQUIRE)
    assert "if-present" in verify_card(card, [], CrlPolicy.IF_PRESENT)
    assert "not checked" in verify_card(card, [], CrlPolicy.IGNORE)
    stale = crl(card.ca, card.ca_key, next_update=_now() - dt.timedelta(seconds=1))
    for policy in (CrlPolicy.REQUIRE, CrlPolicy.IF_PRESENT):
        with pytest.raises(AttestationRefused, match="stale"):
            verify_card(card, [stale], policy)
    # a newer CRL beside the stale one is the one used
    fresh = x509.CertificateRevocationListBuilder(
        issuer_name=card.ca.subject,
        last_update=_now() - dt.timedelta(minutes=5),
        next_update=_now() + dt.timedelta(days=1),
    ).sign(card.ca_key, hashes.SHA256())
    assert verify_card(card, [stale, fresh], CrlPolicy.REQUIRE).startswith("not revoked")


def test_a_crl_whose_scope_leaves_the_certificate_out_does_not_count():
    """A user-certificates-only CRL (RFC 5280 IssuingDistributionPoint) says nothing about a
    CA certificate such as the card's F9 certificate: it does not count as that one's CRL."""
    card = software_card()
    scope = x509.IssuingDistributionPoint(
        full_name=None,
        relative_name=None,
        only_contains_user_certs=True,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )
    users_only = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(card.ca.subject)
        .last_update(_now() - dt.timedelta(minutes=5))
        .next_update(_now() + dt.timedelta(days=1))
        .add_extension(scope, critical=True)
        .sign(card.ca_key, hashes.SHA256())
    )
    # software_card's F9 certificate is a CA (it signs the slot attestations)
    with pytest.raises(AttestationRefused, match="no CRL of CN=software maker"):
        verify_card(card, [users_only], CrlPolicy.REQUIRE)


# -- the trust store and the configuration --------------------------------------------------------


def test_crls_sit_beside_the_cas_as_der_pem_or_inside_a_pem(tmp_path):
    card = software_card()
    one, two = crl(card.ca, card.ca_key, (1,)), crl(card.ca, card.ca_key, (2,))
    pem = serialization.Encoding.PEM
    (tmp_path / "maker.pem").write_bytes(card.ca.public_bytes(pem) + one.public_bytes(pem))
    (tmp_path / "maker.crl").write_bytes(two.public_bytes(serialization.Encoding.DER))
    (tmp_path / "only-crl.pem").write_bytes(two.public_bytes(pem))
    assert load_trust_store(tmp_path) == [card.ca]
    assert sorted(
        c.get_revoked_certificate_by_serial_number(1) is None for c in load_crls(tmp_path)
    ) == [
        False,
        True,
        True,
    ]
    (tmp_path / "broken.crl").write_bytes(b"not a crl")
    with pytest.raises(ConfigError, match=r"broken.crl holds a CRL that cannot be read"):
        load_crls(tmp_path)


def test_the_policy_is_configured_and_checked(tmp_path):
    assert load_config(tmp_path).attestation.hardware_crl == "if-present"
    (tmp_path / "fleetgate.toml").write_text('[attestation]\nhardware_crl = "sometimes"\n')
    with pytest.raises(ConfigError, match="hardware_crl is 'require' or 'if-present' or 'ignore'"):
        load_config(tmp_path)


# -- through the service: refused, audited, nothing issued ---------------------------------------


def test_the_service_refuses_a_revoked_card_and_audits_it(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, tmp_path: Path
) -> None:
    store_path = trust_card_maker(fleet, card.maker)
    maker_key = serialization.load_pem_private_key(card.maker.key_path.read_bytes(), None)
    assert isinstance(maker_key, ec.EllipticCurvePrivateKey)
    with card.open() as piv:
        f9 = piv.attestation_certificate()
    revoked = crl(card.maker.certificate, maker_key, (f9.serial_number,))
    store_path.with_suffix(".crl").write_bytes(revoked.public_bytes(serialization.Encoding.DER))
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "card-revoked")
    keys = SmartcardKeyStore(tmp_path / "device", pin=PIN)
    keys.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    with pytest.raises(EnrollmentError, match="is revoked by"):
        enroll_smartcard(
            keys,
            "card-revoked",
            est_url=est_server.url,
            station_cert=station.cert,
            station_key=station.key,
        )
    keys.close()
    assert fleet.registry.device("card-revoked").state == DeviceState.PENDING
    events = fleet.registry.audit_events(subject="card-revoked")
    assert any(e.outcome == "refused" and "is revoked by" in e.reason for e in events), events
