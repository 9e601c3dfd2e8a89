"""ECC P-256 EKs, low range (L-2, NV 0x01c0000a) and high range (H-2, NV 0x01c00014), on swtpm.

swtpm 0.7.1 makes no P-256 EK certificate, so the test provisions one as a TPM factory would
(tpm_helpers.provision_ek: the TPM's own EK from the TCG template, a certificate from the
manufacturer's issuing CA in the template's NV index). The two templates differ in what makes
the EK's name (L-2: userWithAuth clear, PolicyA, a zero-filled unique; H-2: userWithAuth set,
PolicyB, an empty unique), which decides how the station unlocks the EK for
ActivateCredential; MakeCredential needs the same SHA-256 / AES-128-CFB for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from tpm_helpers import (
    challenge_for,
    hand_driven_enrollment,
    manufactured_tpm,
    provision_ek,
    trust_manufacturer,
)

from device_sdk.est import device_csr
from device_sdk.tpm import Tpm
from enrollment.attestation.tpm import verify_certify
from enrollment.attestation.trust import key_fingerprint
from enrollment.profiles import key_protection_of
from enrollment.registry import DeviceState
from firmware_sim.vtpm import DbusSession, TpmManufacturer, VirtualTpm

KINDS = {"EK-ECC256": 0x01C0000A, "EK-HIGH-ECC256": 0x01C00014}


@pytest.fixture(name="ecc_vtpm", scope="module")
def ecc_vtpm_fixture(
    tmp_path_factory: pytest.TempPathFactory, tpm_bus: DbusSession, tpm_maker: TpmManufacturer
) -> Iterator[VirtualTpm]:
    """A TPM of the trusted manufacturer with both P-256 EK certificates besides swtpm's own."""
    for tpm in manufactured_tpm(tmp_path_factory, tpm_bus, tpm_maker, "ecc"):
        for kind in KINDS:
            provision_ek(tpm, kind)
        yield tpm


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_p256_ek_is_found_recreated_and_challenged(ecc_vtpm, tpm_maker, kind):
    with Tpm(ecc_vtpm.tcti) as chip:
        endorsement = chip.endorsement((kind,))
        assert (endorsement.kind, endorsement.nv_index) == (kind, KINDS[kind])
        ek_key = endorsement.x509().public_key()
        assert isinstance(ek_key, ec.EllipticCurvePublicKey)
        assert isinstance(ek_key.curve, ec.SECP256R1)
        key, ak = chip.create_device_key(), chip.create_attestation_key()
        challenge = challenge_for(tpm_maker, endorsement.certificate, ak.public)
        assert challenge.ek_summary == "EK ECC P-256 issued by CN=swtpm-localca"
        with chip.loaded(ak, key) as (ak_handle, key_handle):
            # _check_ek inside: the EK recreated from the template is the certified key
            secret = chip.activate_credential(
                ak_handle, endorsement, challenge.credential_blob, challenge.encrypted_secret
            )
            certification = chip.certify(key_handle, ak_handle, challenge.nonce)
            csr = device_csr("tpm-ecc", chip.signer(key_handle))
    assert secret == challenge.secret
    verify_certify(
        ak_public=ak.public,
        nonce=challenge.nonce,
        key_public=key.public,
        certify_info=certification.info,
        certify_signature=certification.signature,
        csr_key=csr.public_key(),  # type: ignore[arg-type]
    )


def test_a_credential_for_the_low_range_ek_does_not_open_with_the_high_range_one(
    ecc_vtpm, tpm_maker
):
    """Same curve and parameters, different keys: MakeCredential is bound to the EK shown."""
    from device_sdk.tpm import TpmError

    with Tpm(ecc_vtpm.tcti) as chip:
        low, high = chip.endorsement(("EK-ECC256",)), chip.endorsement(("EK-HIGH-ECC256",))
        assert low.x509().public_key() != high.x509().public_key()
        ak = chip.create_attestation_key()
        challenge = challenge_for(tpm_maker, low.certificate, ak.public)
        with chip.loaded(ak) as (ak_handle,), pytest.raises(TpmError, match="not made for"):
            chip.activate_credential(
                ak_handle, high, challenge.credential_blob, challenge.encrypted_secret
            )


@pytest.mark.parametrize("kind", list(KINDS))
def test_p256_ek_enrollment_end_to_end_through_the_service(
    fleet: Fleet, est_server: RunningServer, ecc_vtpm, tpm_maker, tmp_path: Path, kind
):
    """The station's two round trips over mutual TLS with the P-256 EK; the device is bound
    to that EK and its certificate says TPM."""
    device = f"tpm-ecc-{kind.lower()}"
    trust_manufacturer(fleet, tpm_maker)
    station = fleet.add_station("line-ecc")
    fleet.batch("line-ecc", device)
    with (
        Tpm(ecc_vtpm.tcti) as chip,
        est_server.client(fleet.root, station.cert, station.key) as est,
    ):
        cert = hand_driven_enrollment(est, chip, device, tpm_maker, kinds=(kind,))
        endorsement = chip.endorsement((kind,))
    assert isinstance(cert, x509.Certificate)
    assert key_protection_of(cert) == "tpm"
    registered = fleet.registry.device(device)
    assert (registered.state, registered.key_protection) == (DeviceState.ACTIVE, "tpm")
    assert registered.hardware_binding == key_fingerprint(endorsement.x509())
    events = fleet.registry.audit_events(subject=device)
    assert any("EK ECC P-256" in e.reason for e in events if e.action == "tpm.challenge"), events
