"""The smartcard attestation verifier, pure: evidence bytes and anchors in, a verdict out."""

from __future__ import annotations

import datetime as dt

import pytest
from card_helpers import cn_name, der, make_cert, software_card
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment.attestation import KeyProtection
from enrollment.attestation.piv import verify_piv_attestation
from enrollment.attestation.trust import key_fingerprint
from fleetgate.errors import AttestationRefused


def _now() -> dt.datetime:
    """The time of the check: each test's cards are made when the test runs."""
    return dt.datetime.now(dt.UTC)


def _device_key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_genuine_attestation_is_accepted_and_bound_to_the_card() -> None:
    card, key = software_card(), _device_key()
    attested = verify_piv_attestation(
        attestation_certificate=der(card.attest(key)),
        attestation_intermediate=der(card.f9),
        anchors=[card.ca],
        csr_key=key,
        now=_now(),
    )
    assert attested.protection is KeyProtection.SMARTCARD
    assert attested.public_key == key
    assert attested.binding == key_fingerprint(card.f9)
    assert "card F9" in attested.summary and "software maker" in attested.summary


def test_attestation_from_a_foreign_card_maker_is_refused() -> None:
    trusted, foreign, key = software_card("trusted maker"), software_card("foreign"), _device_key()
    with pytest.raises(AttestationRefused, match="does not chain to a trusted manufacturer"):
        verify_piv_attestation(
            attestation_certificate=der(foreign.attest(key)),
            attestation_intermediate=der(foreign.f9),
            anchors=[trusted.ca],
            csr_key=key,
            now=_now(),
        )


def test_attestation_for_a_different_key_is_refused() -> None:
    card = software_card()
    with pytest.raises(AttestationRefused, match="different key than the CSR"):
        verify_piv_attestation(
            attestation_certificate=der(card.attest(_device_key())),
            attestation_intermediate=der(card.f9),
            anchors=[card.ca],
            csr_key=_device_key(),
            now=_now(),
        )


def test_attestation_signed_by_another_cards_f9_is_refused() -> None:
    """A cloned card's F9 certificate sent beside another card's attestation."""
    card, other, key = software_card(), software_card(), _device_key()
    with pytest.raises(AttestationRefused, match="does not chain"):
        verify_piv_attestation(
            attestation_certificate=der(card.attest(key, signer=other.f9_key)),
            attestation_intermediate=der(card.f9),
            anchors=[card.ca],
            csr_key=key,
            now=_now(),
        )


def test_attestation_signed_by_the_maker_itself_is_refused() -> None:
    """Without the card's F9 key in the path, the binding would name no card."""
    card, key = software_card(), _device_key()
    direct = make_cert(cn_name("attestation 9a"), card.ca.subject, key, card.ca_key, ca=False)
    with pytest.raises(AttestationRefused, match="not signed by the card's attestation"):
        verify_piv_attestation(
            attestation_certificate=der(direct),
            attestation_intermediate=der(card.f9),
            anchors=[card.ca],
            csr_key=key,
            now=_now(),
        )


def test_expired_card_certificate_is_refused() -> None:
    card, key = software_card(), _device_key()
    past = _now() - dt.timedelta(days=30)
    f9 = make_cert(
        cn_name("card F9"),
        card.ca.subject,
        card.f9_key.public_key(),
        card.ca_key,
        ca=True,
        days=10,
        start=past,
    )
    attestation = make_cert(cn_name("attestation 9a"), f9.subject, key, card.f9_key, ca=False)
    with pytest.raises(AttestationRefused, match="expired"):
        verify_piv_attestation(
            attestation_certificate=der(attestation),
            attestation_intermediate=der(f9),
            anchors=[card.ca],
            csr_key=key,
            now=_now(),
        )


def test_no_configured_card_maker_refuses_everything() -> None:
    card, key = software_card(), _device_key()
    with pytest.raises(AttestationRefused, match="no manufacturer CA is configured"):
        verify_piv_attestation(
            attestation_certificate=der(card.attest(key)),
            attestation_intermediate=der(card.f9),
            anchors=[],
            csr_key=key,
            now=_now(),
        )


def test_garbage_evidence_is_refused_not_crashed() -> None:
    card, key = software_card(), _device_key()
    with pytest.raises(AttestationRefused, match=r"not a DER X\.509 certificate"):
        verify_piv_attestation(
            attestation_certificate=b"\x30\x03junk",
            attestation_intermediate=der(card.f9),
            anchors=[card.ca],
            csr_key=key,
            now=_now(),
        )
