"""CA keys in a PKCS#11 token: SoftHSM2 with a throw-away token directory (SOFTHSM2_CONF)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as x509_ocsp
from registry_helpers import new_registry

from enrollment import ocsp, profiles, rotation
from enrollment.ca import ca_paths, init_ca, load_ca
from enrollment.crl import RevokedEntry, build_crl
from enrollment.pkcs11 import PIN_ENV, SOFTHSM_MODULE, generate_key, softhsm_token, token_settings
from enrollment.registry import AuditRecord
from enrollment.registry.authorities import authority_key_id
from enrollment.service import EnrollmentService
from fleetgate.config import Config, load_config
from fleetgate.errors import ConfigError

PIN = "4711"


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SoftHSM2 token per test session, in a directory of its own: the module reads
    SOFTHSM2_CONF once, when the process first loads it. Tests keep apart by key labels."""
    softhsm_token(tmp_path_factory.mktemp("softhsm"), "fleetgate", PIN)
    return "fleetgate"


@pytest.fixture
def hsm_config(home: Path, token: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv(PIN_ENV, PIN)
    config = load_config(home)
    ca = dataclasses.replace(
        config.ca,
        key_store="pkcs11",
        pkcs11_module=str(SOFTHSM_MODULE),
        pkcs11_token_label=token,
        pkcs11_key_label=f"issuing-{secrets.token_hex(4)}",
    )
    return dataclasses.replace(config, ca=ca)


def test_the_issuing_ca_signs_in_the_token_and_its_certificates_crls_and_ocsp_verify(
    hsm_config: Config, tmp_path: Path
) -> None:
    anchors = init_ca(hsm_config)
    paths = ca_paths(hsm_config)
    assert not paths.issuing_key.exists()  # no key file: only the token reference
    label = hsm_config.ca.pkcs11_key_label
    assert paths.issuing_key.with_suffix(".p11").read_text().strip() == label
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
    probe = f"probe-{secrets.token_hex(4)}"
    key = generate_key(token_settings(hsm_config), probe)
    with pytest.raises(TypeError, match="does not allow export"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(ConfigError, match=f"already holds a key labelled '{probe}'"):
        generate_key(token_settings(hsm_config), probe)
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(ConfigError, match="never on the command line"):
        token_settings(hsm_config)


def test_a_rotated_issuing_ca_gets_a_new_key_in_the_token(hsm_config: Config) -> None:
    first = init_ca(hsm_config)
    registry = new_registry(hsm_config.database_url)
    try:
        rotation.register_new_ca(hsm_config, registry, AuditRecord("admin:test", "ca.init", "ok"))
        issuing = rotation.rotate_issuing(hsm_config, registry, actor="admin:test")
        stem = ca_paths(hsm_config).authority(authority_key_id(issuing))
        label = stem.with_suffix(".p11").read_text().strip()
        assert label.startswith(f"{hsm_config.ca.pkcs11_key_label}-")
        service = EnrollmentService(load_ca(hsm_config), registry)
        assert service.ca.anchors.issuing == issuing
        assert len(service.cas.issuers) == 2  # the old CA still answers for its certificates
        crl = service.publish_crl()
        assert crl.is_signature_valid(first.issuing.public_key())  # type: ignore[arg-type]
    finally:
        registry.close()
