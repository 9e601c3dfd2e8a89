"""Key-protection policy, attestation messages, manufacturer trust chains and the challenge store.

The TPM and smartcard verifiers have their own tests against swtpm and a PC/SC card; these cover
what surrounds them: which groups demand hardware, how the device <-> hardware binding and the
single-use challenge behave in the registry, and how malformed evidence is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from registry_helpers import new_registry
from typer.testing import CliRunner

from device_sdk.est import EstError, device_csr
from enrollment.attestation import AttestedKey, KeyProtection
from enrollment.attestation.messages import PivEnrollRequest, TpmChallengeRequest
from enrollment.attestation.trust import key_fingerprint, load_trust_store, verify_chain
from enrollment.cli import app
from enrollment.errors import (
    AttestationRefused,
    KeyProtectionRequired,
    MalformedRequest,
)
from enrollment.policy import Requirement, check_protection
from enrollment.profiles import TPM_KEY_POLICY, key_protection_of
from enrollment.registry import AuditRecord, DeviceState, Registry
from enrollment.registry.models import AttestationChallenge

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def cli(fleet):
    """Run a ``fleetgate`` command in-process against the fleet's data directory."""
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["--home", str(fleet.config.home), *args])


# -- policy (pure) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("required", "proven", "accepted"),
    [
        ("none", KeyProtection.SOFTWARE, True),
        ("none", KeyProtection.TPM, True),
        ("tpm", KeyProtection.TPM, True),
        ("tpm", KeyProtection.SMARTCARD, False),
        ("tpm", KeyProtection.SOFTWARE, False),
        ("smartcard", KeyProtection.SMARTCARD, True),
        ("smartcard", KeyProtection.TPM, False),
        ("any-hardware", KeyProtection.TPM, True),
        ("any-hardware", KeyProtection.SMARTCARD, True),
        ("any-hardware", KeyProtection.SOFTWARE, False),
    ],
)
def test_group_requirement_accepts_only_the_matching_protection(required, proven, accepted):
    if accepted:
        check_protection(device_id="d1", group="g", required=required, proven=proven)
    else:
        with pytest.raises(KeyProtectionRequired, match=f"group g requires {required}"):
            check_protection(device_id="d1", group="g", required=required, proven=proven)


def test_an_unknown_requirement_names_the_choices():
    with pytest.raises(KeyProtectionRequired, match="any-hardware"):
        check_protection(device_id="d1", group="g", required="hsm", proven=KeyProtection.TPM)
    assert [r.value for r in Requirement] == ["none", "tpm", "smartcard", "any-hardware"]


# -- messages -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_well_formed_challenge_request_parses():
    body = json.dumps(
        {"device_id": "d1", "ek_certificate": _b64(b"ek"), "ak_public": _b64(b"ak")}
    ).encode()
    request = TpmChallengeRequest.parse(body)
    assert (request.device_id, request.ek_certificate, request.ek_chain) == ("d1", b"ek", ())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"csr": "AAAA"}', "'attestation_certificate'"),
        (
            b'{"csr": "not base64!", "attestation_certificate": "AA==",'
            b' "attestation_intermediate": "AA=="}',
            "'csr' is not standard base64",
        ),
        (
            json.dumps(
                {
                    "csr": "A" * 20000,
                    "attestation_certificate": "AA==",
                    "attestation_intermediate": "AA==",
                }
            ).encode(),
            "longer than",
        ),
    ],
)
def test_malformed_attestation_messages_say_which_field(body, message):
    with pytest.raises(MalformedRequest, match=message):
        PivEnrollRequest.parse(body)


# -- manufacturer trust chains ------------------------------------------------------------------


def _ca(name: str, issuer=None, *, days: int = 365, start: dt.datetime = NOW, ca: bool = True):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(days=1))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


def test_a_chain_through_an_intermediate_reaches_the_manufacturer_root():
    root = _ca("maker root")
    inter = _ca("maker intermediate", root)
    leaf = _ca("ek", inter, ca=False)
    path = verify_chain(leaf[1], [inter[1]], [root[1]], now=NOW, what="EK certificate")
    assert path == [leaf[1], inter[1], root[1]]


def test_an_unknown_manufacturer_is_refused_with_the_remedy():
    root, other = _ca("maker root"), _ca("someone else")
    leaf = _ca("ek", other, ca=False)
    with pytest.raises(AttestationRefused, match="does not chain to a trusted manufacturer"):
        verify_chain(leaf[1], [], [root[1]], now=NOW, what="EK certificate")


def test_an_expired_evidence_certificate_is_refused():
    root = _ca("maker root")
    leaf = _ca("ek", root, days=1, start=NOW - dt.timedelta(days=30), ca=False)
    with pytest.raises(AttestationRefused, match=r"EK certificate .* expired"):
        verify_chain(leaf[1], [], [root[1]], now=NOW, what="EK certificate")


def test_a_non_ca_certificate_cannot_act_as_issuer():
    root = _ca("maker root")
    not_ca = _ca("end entity", root, ca=False)
    leaf = _ca("ek", not_ca, ca=False)
    with pytest.raises(AttestationRefused, match="does not chain"):
        verify_chain(leaf[1], [not_ca[1]], [root[1]], now=NOW, what="EK certificate")


def test_no_configured_manufacturer_is_a_clear_refusal(tmp_path):
    assert load_trust_store(tmp_path / "absent") == []
    leaf = _ca("ek")
    with pytest.raises(AttestationRefused, match="no manufacturer CA is configured"):
        verify_chain(leaf[1], [], [], now=NOW, what="EK certificate")


# -- registry: challenges, binding, migration ----------------------------------------------------


def _challenge(registry: Registry, cid: str, *, ttl_s: int = 60, actor: str = "station:line-1"):
    registry.add_challenge(
        AttestationChallenge(
            id=cid,
            actor=actor,
            device_id="d1",
            ak_public="",
            nonce="00" * 32,
            secret_sha256="00" * 32,
            ek_fingerprint="ab" * 32,
            expires_at=NOW + dt.timedelta(seconds=ttl_s),
        ),
        AuditRecord(actor, "tpm.challenge", "ok", "d1"),
    )


def test_a_challenge_is_answered_once_then_refused_as_a_replay(fleet):
    _challenge(fleet.registry, "c1")
    assert fleet.registry.consume_challenge("c1", actor="station:line-1", now=NOW).id == "c1"
    with pytest.raises(AttestationRefused, match=r"already answered .* replay"):
        fleet.registry.consume_challenge("c1", actor="station:line-1", now=NOW)


def test_an_expired_or_foreign_challenge_is_refused(fleet):
    _challenge(fleet.registry, "c2", ttl_s=5)
    with pytest.raises(AttestationRefused, match="unknown attestation challenge"):
        fleet.registry.consume_challenge("c2", actor="station:line-2", now=NOW)
    later = NOW + dt.timedelta(seconds=6)
    with pytest.raises(AttestationRefused, match="expired"):
        fleet.registry.consume_challenge("c2", actor="station:line-1", now=later)
    with pytest.raises(AttestationRefused, match="unknown"):
        fleet.registry.consume_challenge("nope", actor="station:line-1", now=NOW)


def _enroll_attested(fleet, device_id: str, binding: str):
    """Record an enrollment as if hardware had vouched for ``key`` (the verifiers are tested
    against real TPMs and cards; here only the registry's binding rule is under test)."""
    fleet.add_station()
    fleet.batch("line-1", device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    attested = AttestedKey(KeyProtection.TPM, key.public_key(), binding, "EK test")
    cert = fleet.service._issue_device(device_id, key.public_key(), KeyProtection.TPM)
    audit = AuditRecord("station:line-1", "tpm.enroll", "ok", device_id)
    fleet.registry.record_enrollment("line-1", device_id, cert, audit, attested)
    return key, cert


def test_a_device_id_stays_bound_to_its_first_hardware(fleet):
    _key, cert = _enroll_attested(fleet, "d1", "ab" * 32)
    device = fleet.registry.device("d1")
    assert (device.key_protection, device.hardware_binding) == ("tpm", "ab" * 32)
    assert key_protection_of(cert) == "tpm"
    assert TPM_KEY_POLICY in [
        p.policy_identifier
        for p in cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    ]
    other = ec.generate_private_key(ec.SECP256R1())
    moved = AttestedKey(KeyProtection.TPM, other.public_key(), "cd" * 32, "another TPM")
    new_cert = fleet.service._issue_device("d1", other.public_key(), KeyProtection.TPM)
    audit = AuditRecord("device:d1", "tpm.enroll", "ok", "d1")
    with pytest.raises(AttestationRefused, match="bound to other hardware"):
        fleet.registry.record_reenrollment("d1", cert.serial_number, new_cert, audit, moved)
    assert fleet.registry.certificate(cert.serial_number).status == "active"
    assert fleet.registry.certificate(new_cert.serial_number) is None


def test_an_older_registry_gains_the_new_columns_on_upgrade(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            'CREATE TABLE device (id VARCHAR(64) PRIMARY KEY, "group" VARCHAR(64) NOT NULL, '
            "state VARCHAR(9) NOT NULL, station_id VARCHAR, created_at DATETIME NOT NULL, "
            "updated_at DATETIME NOT NULL)"
        )
        db.execute(
            "INSERT INTO device VALUES ('old-1', 'default', 'ACTIVE', NULL, '2026-01-01',"
            " '2026-01-01')"
        )
    registry = new_registry(f"sqlite:///{path}")  # what `fleetgate db upgrade` does
    try:
        device = registry.device("old-1")
        assert (device.key_protection, device.hardware_binding) == ("software", None)
        assert device.state == DeviceState.ACTIVE
    finally:
        registry.close()


# -- over HTTPS: a group that requires hardware -------------------------------------------------


def test_a_software_key_is_refused_for_a_group_that_requires_a_tpm(fleet, est_server, cli):
    station = fleet.add_station()
    fleet.batch("line-1", "meter-1", group="meters")
    result = cli("group", "require", "meters", "tpm")
    assert result.exit_code == 0, result.output
    assert "meters" in cli("group", "list").output
    key = ec.generate_private_key(ec.SECP256R1())
    with (
        est_server.client(fleet.root, station.cert, station.key) as est,
        pytest.raises(EstError) as refused,
    ):
        est.simpleenroll(device_csr("meter-1", key))
    assert refused.value.status == 403
    assert "key_protection_required: group meters requires tpm" in refused.value.message
    assert fleet.registry.device("meter-1").state == DeviceState.PENDING
    audit = fleet.registry.audit_events(subject="meter-1")
    assert audit[0].outcome == "refused" and "requires tpm" in audit[0].reason


def test_a_tpm_device_cannot_renew_onto_an_unproven_key(fleet, est_server):
    key, cert = _enroll_attested(fleet, "d1", "ab" * 32)
    crt, keyfile = fleet.write_device("d1", key, cert)
    with est_server.client(fleet.root, crt, keyfile) as est:
        with pytest.raises(EstError, match="tpm-protected; a renewal with a new key"):
            est.simplereenroll(device_csr("d1", ec.generate_private_key(ec.SECP256R1())))
        renewed = est.simplereenroll(device_csr("d1", key))  # the same TPM key: allowed
    assert key_protection_of(renewed) == "tpm"
    assert fleet.registry.certificate(cert.serial_number).status == "superseded"


def test_device_show_reports_protection_and_binding(fleet, cli):
    _enroll_attested(fleet, "d1", "ab" * 32)
    shown = json.loads(cli("device", "show", "d1", "--json").output)
    assert (shown["key"], shown["bound_to"], shown["evidence"]) == ("tpm", "ab" * 32, "EK test")
    assert key_fingerprint(ec.generate_private_key(ec.SECP256R1()).public_key()) != "ab" * 32
