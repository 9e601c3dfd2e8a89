"""Smartcard enrollment end to end: station -> card over PC/SC -> EST service over HTTPS -> card.

Real pcscd + vpcd + pyscard for the station, the real enrollment server for the attestation
check, and OpenSC's and OpenSSL's own tools to confirm the result.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from card_helpers import (
    PIN,
    CardHandle,
    card_fixture,
    card_maker_fixture,
    opensc_tool,
    pcsc_fixture,
    trust_card_maker,
)
from conftest import Fleet, RunningServer, StationCredentials
from cryptography import x509

from device_sdk.errors import EnrollmentError
from device_sdk.piv import CardAbsent, CardRefused, PivCard, WrongPin
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from enrollment.attestation.trust import key_fingerprint
from enrollment.profiles import key_protection_of
from enrollment.registry.models import DeviceState
from firmware_sim.vcard import CardManufacturer

__all__ = ["card_fixture", "card_maker_fixture", "pcsc_fixture"]

DEVICE = "card-sensor-01"


def _prepare(
    fleet: Fleet, directory: Path, *, pin: str = PIN
) -> tuple[SmartcardKeyStore, StationCredentials]:
    station = fleet.add_station("line-1")
    fleet.batch("line-1", DEVICE)
    store = SmartcardKeyStore(directory, pin=pin)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    return store, station


def _enroll(
    store: SmartcardKeyStore, station: StationCredentials, est: RunningServer
) -> x509.Certificate:
    return enroll_smartcard(
        store, DEVICE, est_url=est.url, station_cert=station.cert, station_key=station.key
    )


def test_enrollment_issues_a_smartcard_certificate_written_back_to_the_card(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, tmp_path: Path
) -> None:
    trust_card_maker(fleet, card.maker)
    store, station = _prepare(fleet, tmp_path / "device")
    cert = _enroll(store, station, est_server)
    store.close()

    assert key_protection_of(cert) == "smartcard"
    assert store.certificates()[0] == cert
    with card.open() as piv:
        assert piv.certificate() == cert
        f9 = piv.attestation_certificate()
    device = fleet.registry.device(DEVICE)
    assert device.state == DeviceState.ACTIVE
    assert device.key_protection == "smartcard"
    assert device.hardware_binding == key_fingerprint(f9)

    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(fleet.root),
            "-untrusted",
            str(fleet.chain),
            str(store.certificate_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stderr

    listed = opensc_tool("pkcs15-tool", "--list-certificates")
    assert "Certificate for PIV Authentication" in listed
    pem = opensc_tool("pkcs15-tool", "--read-certificate", "01")
    assert x509.load_pem_x509_certificate(pem.encode()) == cert
    module = _opensc_module()
    objects = opensc_tool("pkcs11-tool", "--module", module, "--login", "--pin", PIN, "-O")
    assert f"CN={DEVICE}" in objects
    assert "never extractable" in objects  # OpenSC's view of the slot 9A private key


def test_attestation_from_an_untrusted_card_maker_is_refused_by_the_service(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, tmp_path: Path
) -> None:
    trust_card_maker(fleet, CardManufacturer.create(tmp_path / "other-maker", name="other"))
    store, station = _prepare(fleet, tmp_path / "device")
    with pytest.raises(EnrollmentError, match="does not chain to a trusted manufacturer"):
        _enroll(store, station, est_server)
    store.close()
    assert not store.certificate_path.exists()
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING
    with card.open() as piv, pytest.raises(CardRefused):
        piv.certificate()  # nothing written to the card


def test_card_removed_mid_enrollment_is_a_clear_error_and_changes_nothing(
    fleet: Fleet,
    est_server: RunningServer,
    card: CardHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trust_card_maker(fleet, card.maker)
    store, station = _prepare(fleet, tmp_path / "device")
    attest = PivCard.attest

    def pulled_then_attest(self: PivCard) -> x509.Certificate:
        card.virtual.remove()  # the operator pulls the card after key generation
        return attest(self)

    monkeypatch.setattr(PivCard, "attest", pulled_then_attest)
    with pytest.raises(CardAbsent, match="went away while trying to attest") as removed:
        _enroll(store, station, est_server)
    assert "reinsert it and start the operation again" in str(removed.value)
    store.close()
    assert not store.certificate_path.exists()
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING


def test_wrong_pin_stops_enrollment_before_the_card_changes(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, tmp_path: Path
) -> None:
    trust_card_maker(fleet, card.maker)
    store, station = _prepare(fleet, tmp_path / "device", pin="654321")
    with pytest.raises(WrongPin) as wrong:
        _enroll(store, station, est_server)
    assert wrong.value.retries_left == 2
    with card.open() as piv:
        assert piv.pin_retries() == 2
        with pytest.raises(CardRefused, match="no key yet"):
            piv.attest()  # no key was generated
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING


def _opensc_module() -> str:
    listing = subprocess.run(
        ["dpkg", "-L", "opensc-pkcs11"], capture_output=True, text=True, check=True
    ).stdout
    return next(line for line in listing.splitlines() if line.endswith("/opensc-pkcs11.so"))
