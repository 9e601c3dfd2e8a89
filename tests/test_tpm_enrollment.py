"""TPM-attested enrollment end to end: a station, a virtual TPM, and the real EST service.

The station code (``enroll_tpm``) drives swtpm through tpm2-abrmd and the service's
``fleetgate/tpm/challenge`` and ``fleetgate/tpm/enroll`` endpoints over mutual TLS. Refusals are
produced by a hand-driven station that changes one thing in an otherwise genuine exchange; each
must be answered 403 with its reason, leave an audit event and leave the device pending.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, RunningServer, StationCredentials
from cryptography import x509
from tpm_helpers import der, ek_chain, hand_driven_enrollment, trust_manufacturer

from device_sdk.errors import EnrollmentError
from device_sdk.est import EstError
from device_sdk.tpm import Tpm
from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import ENROLL, enroll_tpm
from enrollment.attestation.trust import key_fingerprint
from enrollment.profiles import key_protection_of
from enrollment.registry import DeviceState
from firmware_sim.vtpm import VirtualTpm
from fleetgate.errors import AttestationRefused

DEVICE = "tpm-0001"


@pytest.fixture
def station(fleet: Fleet, tpm_maker) -> StationCredentials:
    trust_manufacturer(fleet, tpm_maker)
    credentials = fleet.add_station("line-1")
    fleet.batch("line-1", DEVICE)
    return credentials


def store_for(fleet: Fleet, tpm: VirtualTpm, directory: Path) -> TpmKeyStore:
    store = TpmKeyStore(directory, tcti=tpm.tcti)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    return store


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hand_driven_station(
    est_server: RunningServer,
    fleet: Fleet,
    station: StationCredentials,
    tpm: VirtualTpm,
    maker: Any,
    tamper: Callable[[dict[str, Any]], None],
) -> x509.Certificate:
    """The two round trips done step by step; ``tamper`` edits the enroll request."""
    with (
        Tpm(tpm.tcti) as chip,
        est_server.client(fleet.root, station.cert, station.key) as est,
    ):
        return hand_driven_enrollment(est, chip, DEVICE, maker, tamper=tamper)


def assert_refused_and_unchanged(fleet: Fleet, refusal: EstError, reason: str) -> None:
    assert refusal.status == 403
    assert reason in refusal.message
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING
    events = fleet.registry.audit_events(subject=DEVICE)
    assert any(e.outcome == "refused" and reason in e.reason for e in events), events


def test_a_station_enrolls_a_tpm_key_and_the_certificate_records_it(
    fleet, est_server, station, vtpm, tpm_maker, tmp_path
):
    store = store_for(fleet, vtpm, tmp_path / DEVICE)
    timings: dict[str, float] = {}
    cert = enroll_tpm(
        store,
        DEVICE,
        est_url=est_server.url,
        station_cert=station.cert,
        station_key=station.key,
        ek_chain=ek_chain(tpm_maker),
        timings=timings,
    )
    assert key_protection_of(cert) == "tpm"
    assert cert.public_key() == store.tpm_key().public_key()
    assert store.key_path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert stat.S_IMODE(store.key_path.stat().st_mode) == 0o600
    assert store.ek_chain() == ek_chain(tpm_maker)
    assert set(timings) == {"keygen", "challenge", "activation", "certify", "csr", "issue"}

    device = fleet.registry.device(DEVICE)
    assert (device.state, device.key_protection) == (DeviceState.ACTIVE, "tpm")
    with Tpm(vtpm.tcti) as chip:
        assert device.hardware_binding == key_fingerprint(chip.endorsement().x509())

    command = ["openssl", "verify", "-CAfile", str(fleet.root), "-untrusted", str(fleet.chain)]
    verified = subprocess.run(
        [*command, str(store.certificate_path)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().endswith(": OK")


def test_a_tpm_from_an_unknown_manufacturer_is_refused(fleet, est_server, station, foreign_vtpm):
    with pytest.raises(EnrollmentError, match="does not chain to a trusted manufacturer CA"):
        enroll_tpm(
            store_for(fleet, foreign_vtpm, fleet.config.home / "d"),
            DEVICE,
            est_url=est_server.url,
            station_cert=station.cert,
            station_key=station.key,
        )
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING


def test_a_wrong_activation_secret_is_refused(fleet, est_server, station, vtpm, tpm_maker):
    def wrong_secret(request: dict[str, Any]) -> None:
        request["activated_secret"] = b64(b"\x00" * 32)

    with pytest.raises(EstError) as refused:
        hand_driven_station(est_server, fleet, station, vtpm, tpm_maker, wrong_secret)
    assert_refused_and_unchanged(fleet, refused.value, "activated credential secret is wrong")


def test_certify_about_another_key_than_the_csrs_is_refused(
    fleet, est_server, station, vtpm, tpm_maker
):
    with Tpm(vtpm.tcti) as chip:
        other = chip.create_device_key()

    def other_key(request: dict[str, Any]) -> None:
        request["key_public"] = b64(other.public)

    with pytest.raises(EstError) as refused:
        hand_driven_station(est_server, fleet, station, vtpm, tpm_maker, other_key)
    assert_refused_and_unchanged(fleet, refused.value, "about a different key than key_public")


def test_a_challenge_answered_twice_is_refused_as_a_replay(
    fleet, est_server, station, vtpm, tpm_maker
):
    answered: list[dict[str, Any]] = []

    def wrong_secret_once(request: dict[str, Any]) -> None:
        answered.append(dict(request))
        request["activated_secret"] = b64(b"\x01" * 32)

    with pytest.raises(EstError):
        hand_driven_station(est_server, fleet, station, vtpm, tpm_maker, wrong_secret_once)
    with (
        est_server.client(fleet.root, station.cert, station.key) as est,
        pytest.raises(EstError) as replayed,
    ):
        est.attested_enroll(ENROLL, answered[0])  # the genuine answer, after its challenge was used
    assert replayed.value.status == 403
    assert "was already answered" in replayed.value.message
    assert fleet.registry.device(DEVICE).state == DeviceState.PENDING


def test_an_enrolled_id_cannot_move_to_another_tpm(
    fleet, est_server, station, vtpm, second_vtpm, tpm_maker, tmp_path
):
    """Enrolled on one TPM; a key rotation presenting a second genuine TPM is refused.

    The device's own certificate authenticates the rotation. The service is transport-free, so
    it is called with that certificate directly: no TLS client needs the first TPM's key here.
    """
    store = store_for(fleet, vtpm, tmp_path / DEVICE)
    cert = enroll_tpm(
        store,
        DEVICE,
        est_url=est_server.url,
        station_cert=station.cert,
        station_key=station.key,
        ek_chain=ek_chain(tpm_maker),
    )
    bound = fleet.registry.device(DEVICE).hardware_binding
    with Tpm(second_vtpm.tcti) as chip:
        endorsement = chip.endorsement()
        ak = chip.create_attestation_key()
    body = {
        "device_id": DEVICE,
        "ek_certificate": b64(endorsement.certificate),
        "ek_chain": [b64(der(c)) for c in ek_chain(tpm_maker)],
        "ak_public": b64(ak.public),
    }
    with pytest.raises(AttestationRefused, match="never moves to other hardware"):
        fleet.service.tpm_challenge(cert, json.dumps(body).encode())
    device = fleet.registry.device(DEVICE)
    assert (device.state, device.hardware_binding) == (DeviceState.ACTIVE, bound)
    assert fleet.registry.certificate(cert.serial_number).status == "active"
    events = fleet.registry.audit_events(subject=DEVICE)
    assert any(
        (e.action, e.outcome) == ("tpm.challenge", "refused") and "other hardware" in e.reason
        for e in events
    ), events
