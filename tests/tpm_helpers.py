"""Virtual TPMs for the TPM tests: swtpm + tpm2-abrmd, manufactured by test TPM-manufacturer CAs.

One private session bus serves every TPM of the run (the tabrmd TCTI uses the session bus named
in this process's environment, and GLib keeps one connection to it). The trusted manufacturer
and its TPM live for the whole session (manufacturing takes ~0.7 s); tests that break a TPM
get their own. tests/conftest.py loads this file as a plugin (``pytest_plugins``) rather than
test modules importing the fixtures: imported fixtures are defined once per module, so a
session-scoped TPM would be manufactured again for every module.

Anything that signs TLS with a TPM key runs in a subprocess (:func:`run_device`): the
tpm2-openssl provider is process-wide, and the broker and EST server in the test process sign
with software keys.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMS_NV_PUBLIC
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from device_sdk.est import EstClient, device_csr
from device_sdk.tpm import EK_KINDS, Tpm
from device_sdk.tpm_provisioning import CHALLENGE, ENROLL
from enrollment.attestation.tpm import TpmChallenge, make_challenge
from firmware_sim.vtpm import DbusSession, TpmManufacturer, VirtualTpm

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="tpm_bus", scope="session")
def tpm_bus_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbusSession]:
    bus = DbusSession(tmp_path_factory.mktemp("dbus")).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**bus.environment, "TSS2_LOG": "all+none"}.items():
            mp.setenv(key, value)
        yield bus
    bus.stop()


@pytest.fixture(name="tpm_maker", scope="session")
def tpm_maker_fixture(tmp_path_factory: pytest.TempPathFactory) -> TpmManufacturer:
    """The TPM manufacturer the enrollment service trusts."""
    return TpmManufacturer(tmp_path_factory.mktemp("tpm-maker"))


def manufactured_tpm(
    factory: pytest.TempPathFactory, bus: DbusSession, maker: TpmManufacturer, name: str
) -> Iterator[VirtualTpm]:
    """One swtpm of ``maker`` on ``bus`` for a fixture's lifetime; the fixtures differ only here."""
    with VirtualTpm.manufacture(
        factory.mktemp(f"vtpm-{name}"), manufacturer=maker, bus=bus, name=name
    ) as tpm:
        yield tpm


@pytest.fixture(name="vtpm", scope="session")
def vtpm_fixture(
    tmp_path_factory: pytest.TempPathFactory, tpm_bus: DbusSession, tpm_maker: TpmManufacturer
) -> Iterator[VirtualTpm]:
    """A genuine TPM from the trusted manufacturer, shared by the session."""
    yield from manufactured_tpm(tmp_path_factory, tpm_bus, tpm_maker, "genuine")


@pytest.fixture(name="second_vtpm", scope="session")
def second_vtpm_fixture(
    tmp_path_factory: pytest.TempPathFactory, tpm_bus: DbusSession, tpm_maker: TpmManufacturer
) -> Iterator[VirtualTpm]:
    """Another genuine TPM: the "different TPM" of mix-and-match attacks."""
    yield from manufactured_tpm(tmp_path_factory, tpm_bus, tpm_maker, "second")


@pytest.fixture(name="foreign_vtpm", scope="session")
def foreign_vtpm_fixture(
    tmp_path_factory: pytest.TempPathFactory, tpm_bus: DbusSession
) -> Iterator[VirtualTpm]:
    """A TPM whose EK certificate comes from a manufacturer CA nobody configured."""
    maker = TpmManufacturer(tmp_path_factory.mktemp("unknown-maker"))
    yield from manufactured_tpm(tmp_path_factory, tpm_bus, maker, "foreign")


def anchors(maker: TpmManufacturer) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(maker.ca_certificate.read_bytes())


def ek_chain(maker: TpmManufacturer) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(maker.issuer_certificate.read_bytes())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def trust_manufacturer(fleet: Fleet, maker: TpmManufacturer) -> None:
    """Put the manufacturer's root into the service's TPM trust store directory."""
    store = fleet.config.data_path(fleet.config.attestation.tpm_manufacturer_cas)
    store.mkdir(parents=True, exist_ok=True)
    (store / "test-maker.pem").write_bytes(maker.ca_certificate.read_bytes())


def resigned(
    cert: x509.Certificate, maker: TpmManufacturer, *, not_after: dt.datetime
) -> x509.Certificate:
    """``cert`` re-issued by the manufacturer's intermediate with another end of validity."""
    key = issuer_key(maker)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(min(cert.not_valid_before_utc, not_after - dt.timedelta(days=365)))
        .not_valid_after(not_after)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(key, hashes.SHA256())


def challenge_for(
    maker: TpmManufacturer, ek_certificate: bytes, ak_public: bytes, **trust: Any
) -> TpmChallenge:
    """The verifier's challenge for evidence from ``maker``'s TPM, checked now; ``trust``
    passes CRLs and the CRL policy through."""
    return make_challenge(
        ek_certificate=ek_certificate,
        ek_chain=[der(c) for c in ek_chain(maker)],
        ak_public=ak_public,
        anchors=anchors(maker),
        now=dt.datetime.now(dt.UTC),
        **trust,
    )


def hand_driven_enrollment(
    est: EstClient,
    chip: Tpm,
    device_id: str,
    maker: TpmManufacturer,
    *,
    kinds: tuple[str, ...] = tuple(EK_KINDS),
    tamper: Callable[[dict[str, Any]], None] = lambda request: None,
) -> x509.Certificate:
    """A station's two attestation round trips done step by step with the first EK of
    ``kinds``; ``tamper`` edits the enroll request before it is sent."""
    endorsement = chip.endorsement(kinds)
    key = chip.create_device_key()
    ak = chip.create_attestation_key()
    challenge = est.attestation_json(
        CHALLENGE,
        {
            "device_id": device_id,
            "ek_certificate": _b64(endorsement.certificate),
            "ek_chain": [_b64(der(c)) for c in ek_chain(maker)],
            "ak_public": _b64(ak.public),
        },
    )
    nonce = base64.b64decode(challenge["nonce"])
    with chip.loaded(ak, key) as (ak_handle, key_handle):
        secret = chip.activate_credential(
            ak_handle,
            endorsement,
            base64.b64decode(challenge["credential_blob"]),
            base64.b64decode(challenge["encrypted_secret"]),
        )
        certification = chip.certify(key_handle, ak_handle, nonce)
        csr = device_csr(device_id, chip.signer(key_handle))
    request = {
        "challenge_id": challenge["challenge_id"],
        "activated_secret": _b64(secret),
        "csr": _b64(csr.public_bytes(serialization.Encoding.DER)),
        "key_public": _b64(key.public),
        "certify_info": _b64(certification.info),
        "certify_signature": _b64(certification.signature),
    }
    tamper(request)
    return est.attested_enroll(ENROLL, request)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def provision_ek(tpm: VirtualTpm, kind: str) -> x509.Certificate:
    """Give ``tpm`` an EK of ``kind`` ("EK-ECC256": L-2, "EK-HIGH-ECC256": H-2, ...) with a
    certificate from its manufacturer in the kind's NV index, as a TPM factory does: swtpm
    0.7.1's ``swtpm_setup`` makes RSA-2048 and P-384 EK certificates only.

    The EK is the TPM's own primary from the TCG template; the certificate copies the swtpm
    RSA EK certificate's TCG extensions (SAN with the TPM's model, EK policy) with this key.
    The NV index is owner-defined with the read attributes ``NVReadEK`` uses.
    """
    index = EK_KINDS[kind]

    def placeholder(nv: int) -> bytes:  # the template's defaults; no certificate exists yet
        if nv == index:
            return b"placeholder"
        raise NoSuchIndex(nv)

    _, template = create_ek_template(kind, placeholder)
    with Tpm(tpm.direct_tcti) as chip:
        model = chip.endorsement(("EK-RSA2048",)).x509()
    ectx = ESAPI(tpm.direct_tcti)
    try:
        handle, public, _, _, _ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        ectx.flush_context(handle)
        key = serialization.load_pem_public_key(public.to_pem())
        assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(model.subject)
            .issuer_name(model.issuer)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(model.not_valid_before_utc)
            .not_valid_after(model.not_valid_after_utc)
        )
        skipped = (x509.KeyUsage, x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)
        for extension in model.extensions:
            if not isinstance(extension.value, skipped):
                builder = builder.add_extension(extension.value, extension.critical)
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "data_encipherment", "key_cert_sign",
             "crl_sign", "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        ecc = isinstance(key, ec.EllipticCurvePublicKey)
        builder = builder.add_extension(
            x509.KeyUsage(key_encipherment=not ecc, key_agreement=ecc, **usage), critical=True
        )
        cert = builder.sign(issuer_key(tpm.manufacturer), hashes.SHA256())
        data = der(cert)
        attributes = (
            TPMA_NV.OWNERWRITE
            | TPMA_NV.AUTHWRITE
            | TPMA_NV.OWNERREAD
            | TPMA_NV.AUTHREAD
            | TPMA_NV.NO_DA
        )
        nv = ectx.nv_define_space(
            b"",
            TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=index,
                    nameAlg=TPM2_ALG.SHA256,
                    attributes=attributes,
                    dataSize=len(data),
                )
            ),
        )
        for offset in range(0, len(data), 512):  # below swtpm's MAX_NV_BUFFER_SIZE
            ectx.nv_write(nv, data[offset : offset + 512], offset)
    finally:
        ectx.close()
    return cert


def issuer_key(maker: TpmManufacturer) -> rsa.RSAPrivateKey:
    """The manufacturer's EK-issuing key (``swtpm_localca`` writes certtool's text, then PEM)."""
    text = maker.issuer_key.read_bytes()
    key = serialization.load_pem_private_key(text[text.index(b"-----BEGIN") :], None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def run_device(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh Python (repo on the path); its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer
