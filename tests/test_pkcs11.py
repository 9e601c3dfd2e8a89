"""CA keys in a PKCS#11 token: SoftHSM2 with a throw-away token directory (SOFTHSM2_CONF)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp

from enrollment import ocsp, profiles
from enrollment.ca import ca_paths, init_ca, load_ca
from enrollment.crl import RevokedEntry, build_crl
from enrollment.pkcs11 import PIN_ENV, SOFTHSM_MODULE, generate_key, softhsm_token, token_settings
from fleetgate.config import Config, load_config
from fleetgate.errors import ConfigError

PIN = "4711"


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SoftHSM2 token labelled ``fleetgate`` in a directory of this test's own."""
    monkeypatch.setenv("SOFTHSM2_CONF", "")  # restored after the test
    softhsm_token(tmp_path, "fleetgate", PIN)
    monkeypatch.setenv(PIN_ENV, PIN)
    return "fleetgate"


@pytest.fixture
def hsm_config(home: Path, token: str) -> Config:
    config = load_config(home)
    ca = dataclasses.replace(
        config.ca,
        key_store="pkcs11",
        pkcs11_module=str(SOFTHSM_MODULE),
        pkcs11_token_label=token,
    )
    return dataclasses.replace(config, ca=ca)


def test_the_issuing_ca_signs_in_the_token_and_its_certificates_crls_and_ocsp_verify(
    hsm_config: Config, tmp_path: Path
) -> None:
    anchors = init_ca(hsm_config)
    paths = ca_paths(hsm_config)
    assert not paths.issuing_key.exists()  # no key file: only the token reference
    assert paths.issuing_key.with_suffix(".p11").read_text().strip() == "fleetgate-issuing"
    ca = load_ca(hsm_config)
    assert ca.issuer.key.public_key() == anchors.issuing.public_key()
    device_key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        profiles.DEVICE,
        profiles.Subject("sensor-1", uris=("urn:fleetgate:device:sensor-1",)),
        device_key.public_key(),
        dt.timedelta(days=1),
    )
    cert.verify_directly_issued_by(anchors.issuing)
    chain = tmp_path / "chain.pem"
    leaf = tmp_path / "leaf.pem"
    chain.write_bytes(paths.chain.read_bytes())
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(chain), str(leaf)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr

    now = dt.datetime.now(dt.UTC)
    crl = build_crl(
        ca.issuer,
        [RevokedEntry(7, now, x509.ReasonFlags.key_compromise)],
        now=now,
        next_update=dt.timedelta(hours=1),
    )
    assert crl.is_signature_valid(anchors.issuing.public_key())  # type: ignore[arg-type]

    request = (
        x509_ocsp.OCSPRequestBuilder()
        .add_certificate(cert, anchors.issuing, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    der = ocsp.respond(
        request,
        issuers=[ca.issuer],
        lookup=lambda serial: ocsp.CertificateStatus(revoked=False),
        now=now,
        validity=dt.timedelta(hours=1),
    )
    response = x509_ocsp.load_der_ocsp_response(der)
    assert response.certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    issuing_key = anchors.issuing.public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    issuing_key.verify(
        response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm)
    )


def test_the_token_key_cannot_be_exported_and_the_pin_never_comes_from_the_command_line(
    hsm_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key(token_settings(hsm_config), "probe")
    with pytest.raises(TypeError, match="does not allow export"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(ConfigError, match="already holds a key labelled 'probe'"):
        generate_key(token_settings(hsm_config), "probe")
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(ConfigError, match="never on the command line"):
        token_settings(hsm_config)
