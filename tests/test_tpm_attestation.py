"""TPM attestation against real swtpm + tpm2-abrmd: the station's TPM code and the pure verifier.

Each refusal below is evidence a real TPM produced, altered in one way: from an unknown
manufacturer, expired, activated by the wrong TPM, certifying another key or by another AK,
over another nonce, or about a key that was imported (no fixedTPM). The key's attributes are
confirmed by tpm2-tools reading the key back from the TPM.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SYM_DEF_OBJECT,
)
from tpm2_pytss.utils import wrap
from tpm_helpers import anchors, der, ek_chain, resigned

from device_sdk.est import device_csr
from device_sdk.tpm import (
    _SRK_TEMPLATE,
    DEVICE_KEY_ATTRIBUTES,
    Certification,
    Tpm,
    TpmError,
    TpmKey,
    TpmUnavailable,
    _p256_template,
)
from enrollment.attestation.tpm import TpmChallenge, make_challenge, verify_certify
from firmware_sim.vtpm import TpmManufacturer, VirtualTpm
from fleetgate.errors import AttestationRefused


@dataclass(frozen=True)
class Evidence:
    """One station run: what the TPM made and what the verifier was told."""

    challenge: TpmChallenge
    ak: TpmKey
    key: TpmKey
    activated: bytes
    certification: Certification
    csr: x509.CertificateSigningRequest


def attest(
    tpm: Tpm,
    maker: TpmManufacturer,
    *,
    ek_kinds: tuple[str, ...] = ("EK-RSA2048",),
    key: TpmKey | None = None,
) -> Evidence:
    """The station's steps against ``tpm``, with the verifier's challenge in the middle."""
    endorsement = tpm.endorsement(ek_kinds)
    key = key or tpm.create_device_key()
    ak = tpm.create_attestation_key()
    challenge = make_challenge(
        ek_certificate=endorsement.certificate,
        ek_chain=[der(c) for c in ek_chain(maker)],
        ak_public=ak.public,
        anchors=anchors(maker),
        now=dt.datetime.now(dt.UTC),
    )
    with tpm.loaded(ak, key) as (ak_handle, key_handle):
        activated = tpm.activate_credential(
            ak_handle, endorsement, challenge.credential_blob, challenge.encrypted_secret
        )
        certification = tpm.certify(key_handle, ak_handle, challenge.nonce)
        csr = device_csr("tpm-0001", tpm.signer(key_handle))
    return Evidence(challenge, ak, key, activated, certification, csr)


def verify(evidence: Evidence, **override: object) -> None:
    arguments: dict[str, object] = {
        "ak_public": evidence.ak.public,
        "nonce": evidence.challenge.nonce,
        "key_public": evidence.key.public,
        "certify_info": evidence.certification.info,
        "certify_signature": evidence.certification.signature,
        "csr_key": evidence.csr.public_key(),
    }
    verify_certify(**{**arguments, **override})  # type: ignore[arg-type]


@pytest.fixture
def tpm(vtpm: VirtualTpm):
    with Tpm(vtpm.tcti) as handle:
        yield handle


# -- genuine evidence ----------------------------------------------------------------------------


@pytest.mark.parametrize("ek_kind", ["EK-RSA2048", "EK-HIGH-ECC384"])
def test_genuine_evidence_is_accepted_with_either_ek(tpm, tpm_maker, ek_kind):
    evidence = attest(tpm, tpm_maker, ek_kinds=(ek_kind,))
    assert evidence.activated == evidence.challenge.secret
    verify(evidence)
    assert evidence.csr.is_signature_valid
    assert evidence.csr.public_key() == evidence.key.public_key()
    expected = "EK RSA-2048" if ek_kind == "EK-RSA2048" else "EK ECC P-384"
    assert evidence.challenge.ek_summary == f"{expected} issued by CN=swtpm-localca"


def test_the_station_prefers_the_rsa_ek_and_swtpm_has_no_p256_ek_certificate(tpm):
    endorsement = tpm.endorsement()
    assert (endorsement.kind, endorsement.nv_index) == ("EK-RSA2048", 0x01C00002)
    assert tpm.endorsement(("EK-ECC256", "EK-HIGH-ECC384")).nv_index == 0x01C00016


def test_the_device_key_attributes_as_tpm2_tools_read_them(vtpm, tpm, tmp_path):
    """tpm2_load under the standard ECC SRK, then tpm2_readpublic on the loaded key."""
    key = tpm.create_device_key()
    (tmp_path / "key.pub").write_bytes(key.public)
    (tmp_path / "key.priv").write_bytes(key.private)
    env = {**os.environ, "TPM2TOOLS_TCTI": vtpm.tcti}

    def tool(*args: str) -> str:
        result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout

    tool(
        "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc256:null:aes128cfb",
        "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
        "-c", "srk.ctx",
    )  # fmt: skip
    tool("tpm2_load", "-C", "srk.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
    shown = tool("tpm2_readpublic", "-c", "key.ctx")
    attributes = re.search(r"attributes:\n\s+value: (\S+)", shown)
    assert attributes is not None, shown
    assert set(attributes.group(1).split("|")) == {
        "fixedtpm",
        "fixedparent",
        "sensitivedataorigin",
        "userwithauth",
        "sign",
    }
    assert "curve-id:\n  value: NIST p256" in shown
    assert f"name: {key.name.hex()}" in shown
    assert key.attributes == int(DEVICE_KEY_ATTRIBUTES)


def test_the_key_pem_is_a_tss2_private_key_that_round_trips(tpm):
    key = tpm.create_device_key()
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert TpmKey.from_pem(pem) == key


# -- refusals ------------------------------------------------------------------------------------


def test_an_ek_certificate_from_an_unknown_manufacturer_is_refused(foreign_vtpm, tpm_maker):
    with Tpm(foreign_vtpm.tcti) as foreign:
        endorsement = foreign.endorsement()
        ak = foreign.create_attestation_key()
    with pytest.raises(AttestationRefused, match="does not chain to a trusted manufacturer CA"):
        make_challenge(
            ek_certificate=endorsement.certificate,
            ek_chain=[der(c) for c in ek_chain(foreign_vtpm.manufacturer)],
            ak_public=ak.public,
            anchors=anchors(tpm_maker),
            now=dt.datetime.now(dt.UTC),
        )


def test_an_expired_ek_certificate_is_refused(tpm, tpm_maker):
    genuine = tpm.endorsement().x509()
    ak = tpm.create_attestation_key()

    def challenge(ek_cert: x509.Certificate) -> TpmChallenge:
        return make_challenge(
            ek_certificate=der(ek_cert),
            ek_chain=[der(c) for c in ek_chain(tpm_maker)],
            ak_public=ak.public,
            anchors=anchors(tpm_maker),
            now=dt.datetime.now(dt.UTC),
        )

    challenge(
        resigned(genuine, tpm_maker, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )  # re-signing is sound
    expired = resigned(genuine, tpm_maker, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    with pytest.raises(AttestationRefused, match=r"the EK certificate \(.*\) expired on"):
        challenge(expired)


def test_a_credential_for_another_tpms_ek_cannot_be_activated(tpm, second_vtpm, tpm_maker):
    """A station that shows TPM A's EK certificate with an AK from TPM B gets nothing back."""
    with Tpm(second_vtpm.tcti) as other:
        other_ek = other.endorsement()
    ak = tpm.create_attestation_key()
    challenge = make_challenge(
        ek_certificate=other_ek.certificate,
        ek_chain=[der(c) for c in ek_chain(tpm_maker)],
        ak_public=ak.public,
        anchors=anchors(tpm_maker),
        now=dt.datetime.now(dt.UTC),
    )
    with (
        tpm.loaded(ak) as (ak_handle,),
        pytest.raises(TpmError, match="not made for this TPM's EK and this attestation key"),
    ):
        tpm.activate_credential(
            ak_handle, tpm.endorsement(), challenge.credential_blob, challenge.encrypted_secret
        )


def test_a_credential_for_another_ak_name_cannot_be_activated(tpm, tpm_maker):
    evidence = attest(tpm, tpm_maker)
    other_ak = tpm.create_attestation_key()
    with (
        tpm.loaded(other_ak) as (ak_handle,),
        pytest.raises(TpmError, match="ActivateCredential refused the challenge"),
    ):
        tpm.activate_credential(
            ak_handle,
            tpm.endorsement(),
            evidence.challenge.credential_blob,
            evidence.challenge.encrypted_secret,
        )


def test_certify_over_a_different_key_is_refused(tpm, tpm_maker):
    evidence = attest(tpm, tpm_maker)
    other = tpm.create_device_key()
    with pytest.raises(AttestationRefused, match="about a different key than key_public"):
        verify(evidence, key_public=other.public, csr_key=other.public_key())
    with pytest.raises(AttestationRefused, match="not the CSR's key"):
        verify(evidence, csr_key=ec.generate_private_key(ec.SECP256R1()).public_key())


def test_certify_by_a_different_ak_is_refused(tpm, tpm_maker):
    evidence = attest(tpm, tpm_maker)
    rogue_ak = tpm.create_attestation_key()
    with tpm.loaded(rogue_ak, evidence.key) as (ak_handle, key_handle):
        rogue = tpm.certify(key_handle, ak_handle, evidence.challenge.nonce)
    with pytest.raises(AttestationRefused, match="signed by a different AK"):
        verify(evidence, certify_info=rogue.info, certify_signature=rogue.signature)


def test_certify_over_another_nonce_is_refused_as_a_replay(tpm, tpm_maker):
    earlier = attest(tpm, tpm_maker)
    later = attest(tpm, tpm_maker, key=earlier.key)
    with pytest.raises(AttestationRefused, match="not over this challenge's nonce"):
        verify(later, nonce=earlier.challenge.nonce)
    with pytest.raises(AttestationRefused, match="replayed"):
        verify(earlier, nonce=b"\x00" * 32)


def test_an_altered_certify_statement_is_refused(tpm, tpm_maker):
    evidence = attest(tpm, tpm_maker)
    info = bytearray(evidence.certification.info)
    info[-1] ^= 1
    with pytest.raises(AttestationRefused, match="does not verify"):
        verify(evidence, certify_info=bytes(info))


def test_an_imported_software_key_lacks_fixed_tpm_and_is_refused(vtpm, tpm, tpm_maker):
    """TPM2_Import of a P-256 key from software: the TPM certifies it, truthfully, as not
    fixedTPM (the TPM refuses to import a key with fixedTPM or fixedParent set)."""
    software = ec.generate_private_key(ec.SECP256R1())
    pem = software.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = TPM2B_PUBLIC.from_pem(
        pem, objectAttributes=TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT
    )
    sensitive = TPM2B_SENSITIVE.from_pem(pem)
    ectx = ESAPI(vtpm.tcti)
    try:
        srk, srk_public, _, _, _ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), _SRK_TEMPLATE, ESYS_TR.OWNER
        )
        symdef = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
        encryption_key, duplicate, seed = wrap(srk_public.publicArea, public, sensitive, None, None)
        private = ectx.import_(srk, encryption_key, public, duplicate, seed, symdef)
        ectx.flush_context(srk)
    finally:
        ectx.close()
    imported = TpmKey(private=private.marshal(), public=public.marshal())
    evidence = attest(tpm, tpm_maker, key=imported)
    assert evidence.csr.public_key() == software.public_key()  # the TPM signs with the copy
    with pytest.raises(AttestationRefused, match=r"lacks the attribute.*fixedTPM.*imported"):
        verify(evidence)


def test_a_key_created_without_fixed_tpm_is_refused(tpm, tpm_maker):
    duplicable = tpm._create(
        _p256_template(
            int(DEVICE_KEY_ATTRIBUTES) & ~int(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT),
            sign_scheme=False,
        ),
        "create a duplicable key",
    )
    evidence = attest(tpm, tpm_maker, key=duplicable)
    with pytest.raises(AttestationRefused, match=r"lacks the attribute\(s\) fixedTPM, fixedParent"):
        verify(evidence)


def test_the_resource_manager_down_is_named_with_how_to_start_it(
    tmp_path: Path, tpm_bus, tpm_maker
):
    with VirtualTpm.manufacture(tmp_path, manufacturer=tpm_maker, bus=tpm_bus) as spare:
        with Tpm(spare.tcti) as working:
            working.endorsement()
        spare.stop_resource_manager()
        with pytest.raises(TpmUnavailable) as refused:
            Tpm(spare.tcti)
        message = str(refused.value)
        assert "TPM resource manager is not reachable" in message
        assert spare.bus_name in message
        assert "tpm2-abrmd" in message
        with Tpm(spare.direct_tcti) as direct:  # the TPM itself is still there
            assert direct.endorsement().kind == "EK-RSA2048"
