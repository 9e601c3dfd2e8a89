"""The PIV applet through real PC/SC (pcscd + vpcd + pyscard): PIN, keys, objects, attestation."""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from card_helpers import PIN, CardHandle, card_fixture, card_maker_fixture, pcsc_fixture
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.est import device_csr
from device_sdk.piv import CardRefused, PinBlocked, PivCardKey, PivError, WrongPin

__all__ = ["card_fixture", "card_maker_fixture", "pcsc_fixture"]


def test_wrong_pin_reports_the_tries_left_and_the_counter_decrements(card: CardHandle) -> None:
    with card.open() as piv:
        assert piv.pin_retries() == 3
        with pytest.raises(WrongPin) as first:
            piv.verify_pin("000000")
        assert first.value.retries_left == 2
        assert "2 tries left" in str(first.value)
        assert piv.pin_retries() == 2
        piv.verify_pin(PIN)  # a right PIN restores the counter
        with pytest.raises(WrongPin) as again:
            piv.verify_pin("000000")
        assert again.value.retries_left == 2


def test_pin_locks_after_three_wrong_tries_even_across_a_reinsertion(card: CardHandle) -> None:
    with card.open() as piv:
        for left in (2, 1):
            with pytest.raises(WrongPin) as wrong:
                piv.verify_pin("999999")
            assert wrong.value.retries_left == left
    card.reinsert()  # pulling the card does not reset the counter
    with card.open() as piv:
        assert piv.pin_retries() == 1
        with pytest.raises(PinBlocked):
            piv.verify_pin("999999")
        with pytest.raises(PinBlocked, match="PUK"):
            piv.verify_pin(PIN)  # blocked: even the right PIN is refused
        assert piv.pin_retries() == 0


def test_signing_needs_the_pin(card: CardHandle) -> None:
    with card.open() as piv:
        piv.verify_pin(PIN)
        piv.generate_key()
    card.reinsert()  # a new session: the PIN is no longer verified
    with card.open() as piv, pytest.raises(CardRefused, match="verify the PIN first"):
        piv.sign_digest(bytes(32))


def test_card_key_signs_a_csr_that_openssl_verifies(card: CardHandle, tmp_path: object) -> None:
    with card.open() as piv:
        piv.verify_pin(PIN)
        public = piv.generate_key()
        key = PivCardKey(piv, public)
        signature = key.sign(b"hello", ec.ECDSA(hashes.SHA256()))
        public.verify(signature, b"hello", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            public.verify(signature, b"hellO", ec.ECDSA(hashes.SHA256()))
        csr = device_csr("card-0001", key)
    assert csr.is_signature_valid and csr.public_key() == public
    check = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-inform", "DER"],
        input=csr.public_bytes(serialization.Encoding.DER),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert b"verify OK" in check.stdout + check.stderr


def test_the_key_cannot_be_exported(card: CardHandle) -> None:
    with card.open() as piv:
        piv.verify_pin(PIN)
        key = PivCardKey(piv, piv.generate_key())
        with pytest.raises(PivError, match="never leaves the card"):
            key.private_numbers()
        with pytest.raises(PivError, match="never leaves the card"):
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )


def test_certificate_is_stored_and_read_back_through_chaining(card: CardHandle) -> None:
    with card.open() as piv:
        piv.verify_pin(PIN)
        public = piv.generate_key()
        with pytest.raises(CardRefused) as nothing:
            piv.certificate()
        assert nothing.value.sw == 0x6A82
        cert = _long_certificate(public)
        assert len(cert.public_bytes(serialization.Encoding.DER)) > 600  # 3 chained APDUs
        piv.put_certificate(cert)
        assert piv.certificate() == cert
    card.reinsert()
    with card.open() as piv:
        assert piv.certificate() == cert  # in the card's memory, not the session


def test_attestation_vouches_for_the_generated_key(card: CardHandle) -> None:
    with card.open() as piv:
        with pytest.raises(CardRefused, match="no key yet"):
            piv.attest()
        piv.verify_pin(PIN)
        public = piv.generate_key()
        attestation = piv.attest()
        f9 = piv.attestation_certificate()
    assert attestation.public_key() == public
    attestation.verify_directly_issued_by(f9)
    f9.verify_directly_issued_by(card.maker.certificate)
    serials = f9.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert [a.value for a in serials] == [str(card.serial)]
    assert "9a" in attestation.subject.rfc4514_string()


def test_regenerating_replaces_the_key_and_drops_its_certificate(card: CardHandle) -> None:
    with card.open() as piv:
        piv.verify_pin(PIN)
        first = piv.generate_key()
        piv.put_certificate(_long_certificate(first))
        second = piv.generate_key()
        assert second != first
        assert piv.attest().public_key() == second
        with pytest.raises(CardRefused):
            piv.certificate()


def _long_certificate(public: ec.EllipticCurvePublicKey) -> x509.Certificate:
    """A self-issued certificate padded with SAN URIs so it needs command chaining."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "card-0001")])
    now = dt.datetime.now(dt.UTC)
    uris = [x509.UniformResourceIdentifier(f"urn:test:{i:04d}:{'x' * 40}") for i in range(12)]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(uris), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
