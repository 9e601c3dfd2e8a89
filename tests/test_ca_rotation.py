"""CA rotation with a live fleet: SDK devices on fleetgate's broker, renewing over the real EST
server, through an issuing rotation and a root rotation; and a device that missed the window."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker, enroll
from conftest import Fleet, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sdk_helpers import Devices, devices_fixture, wait_for  # noqa: F401  (fixtures)

from device_sdk import DeviceClient, EnrollmentError, NotConnected, RenewalPolicy
from device_sdk.est import station_csr
from enrollment import rotation
from enrollment.ca import ServerCredentials, ca_paths, ensure_server_certificate
from enrollment.registry import DeviceState
from enrollment.registry.authorities import authority_key_id
from enrollment.registry.certificates import issuer_key_id
from enrollment.registry.models import AuthorityRole, AuthorityState
from fleetgate.config import Config
from fleetgate.errors import CAPassphraseError
from fleetgate.keyfiles import load_certificates, write_certificates

FLEET = ("sensor-1", "sensor-2", "sensor-3")
FLEETGATE = Path(sys.executable).with_name("fleetgate")


@pytest.fixture
def config(config: Config) -> Config:
    """Rotations are noticed within 0.2 s."""
    ca = dataclasses.replace(config.ca, authority_poll_interval_s=0.2)
    return dataclasses.replace(config, ca=ca)


@pytest.fixture
def broker(fleet: Fleet) -> Iterator[RunningBroker]:
    running = RunningBroker(fleet).start()
    yield running
    running.stop()


def _publish_from_each(clients: dict[str, DeviceClient], tag: str) -> None:
    for device_id, client in clients.items():
        ack = client.publish(f"devices/{device_id}/telemetry", tag.encode())
        ack.wait(10)


def _wait_on(client: DeviceClient, cert: x509.Certificate) -> None:
    """The client's session moved to ``cert`` (it drains the old one first)."""

    def moved() -> bool:
        try:
            return client.wait_connected(0.05).certificate_serial == cert.serial_number
        except NotConnected:
            return False

    wait_for(moved, 10, "the session moving to the renewed certificate")


def _recertify_station(fleet: Fleet) -> None:
    """The station gets a certificate of the new CA (a station on the old one holds up retire)."""
    fleet.service.refresh_authorities()
    fleet.registry.revoke_station("line-1", "superseded", "admin:test")
    fleet.add_station("line-1")


def _refusals(broker: RunningBroker) -> int:
    metrics = broker.broker.metrics
    return sum(metrics.connect_refusals.values()) + sum(metrics.handshake_failures.values())


def _picked_up(est: RunningServer, broker: RunningBroker, signer: x509.Certificate) -> None:
    """The EST server signs with ``signer`` and the broker trusts it (polls of the registry)."""
    wait_for(lambda: est.server.service.ca.anchors.issuing == signer, 10, "the EST server")
    wait_for(broker.broker.trust_changed.is_set, 10, "the broker trusting the new CA")
    broker.broker.trust_changed.clear()


def test_devices_keep_publishing_through_an_issuing_and_a_root_rotation(
    fleet: Fleet, est_server: RunningServer, broker: RunningBroker, devices: Devices
) -> None:
    stores = {d: devices.enroll(d) for d in FLEET}
    clients = {d: devices.client(s, d, broker).start() for d, s in stores.items()}
    for client in clients.values():
        client.wait_connected(10)
    _publish_from_each(clients, "before")
    first_issuing = fleet.service.ca.anchors.issuing
    old_root = fleet.service.ca.anchors.root

    # -- issuing rotation: new CA under the same root; devices move over as they renew ----------
    issuing = rotation.rotate_issuing(fleet.config, fleet.registry, actor="admin:test")
    _picked_up(est_server, broker, issuing)
    assert fleet.registry.active_devices_by_issuer()[authority_key_id(first_issuing)] == 3
    for client in clients.values():
        renewed = client.renew()
        assert renewed.issuer == issuing.subject
        _wait_on(client, renewed)
    _publish_from_each(clients, "after issuing rotation")
    assert fleet.registry.active_devices_by_issuer()[authority_key_id(first_issuing)] == 0
    _recertify_station(fleet)
    done = rotation.retire(
        fleet.config, fleet.registry, authority_key_id(first_issuing), force=False, actor="t"
    )
    assert done.cut_off == ()

    # -- root rotation: new root cross-certified both ways; devices learn it from cacerts -------
    new_root = rotation.rotate_root(fleet.config, fleet.registry, actor="admin:test")
    fleet.service.refresh_authorities()
    _picked_up(est_server, broker, fleet.service.ca.anchors.issuing)
    for device_id, client in clients.items():
        renewed = client.renew()
        _wait_on(client, renewed)
        anchors = x509.load_pem_x509_certificates(stores[device_id].trust_anchors_path.read_bytes())
        assert {a.fingerprint(hashes.SHA256()) for a in anchors} == {
            old_root.fingerprint(hashes.SHA256()),
            new_root.fingerprint(hashes.SHA256()),
        }
        renewed.verify_directly_issued_by(stores[device_id].certificates()[1])
    _publish_from_each(clients, "after root rotation")
    assert _refusals(broker) == 0, "a reconnect was refused during the rotations"

    _recertify_station(fleet)
    retired = rotation.retire(
        fleet.config, fleet.registry, authority_key_id(old_root), force=False, actor="t"
    )
    assert {r.role for r in retired.retired} == {
        AuthorityRole.ROOT,
        AuthorityRole.ISSUING,
        AuthorityRole.CROSS,
    }
    live = fleet.registry.authorities(include_retired=False)
    assert {(r.role, r.state) for r in live} == {
        (AuthorityRole.ROOT, AuthorityState.ACTIVE),
        (AuthorityRole.ISSUING, AuthorityState.ACTIVE),
    }
    actions = [e.action for e in fleet.registry.audit_events(limit=1000)]
    for action in ("ca.rotate.issuing", "ca.rotate.root", "ca.retire"):
        assert action in actions


def test_a_device_that_missed_the_window_is_refused_clearly(
    fleet: Fleet, est_server: RunningServer, broker: RunningBroker, devices: Devices
) -> None:
    away = devices.enroll("sensor-9")
    old = fleet.service.ca.anchors.issuing
    issuing = rotation.rotate_issuing(fleet.config, fleet.registry, actor="admin:test")
    _picked_up(est_server, broker, issuing)
    _recertify_station(fleet)
    with pytest.raises(rotation.DevicesStillOnCA, match=r"1 active device\(s\).*sensor-9"):
        rotation.retire(fleet.config, fleet.registry, authority_key_id(old), force=False, actor="t")
    forced = rotation.retire(
        fleet.config, fleet.registry, authority_key_id(old), force=True, actor="t"
    )
    assert forced.cut_off == ("device:sensor-9",)

    client = devices.client(away, "sensor-9", broker)
    with pytest.raises(EnrollmentError, match="issuing CA was retired before it renewed"):
        client.renew()
    client.start()
    wait_for(lambda: client.last_error is not None, 10, "a refused connect")
    assert "revoked" in str(client.last_error)
    refused = [e.action for e in fleet.registry.audit_events(limit=1000) if e.outcome == "refused"]
    assert "ca.retire" in refused


def test_the_cli_rotates_counts_and_retires_with_one_line_refusals(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(FLEETGATE_HOME=str(tmp_path / "data"), FLEETGATE_CA_PASSPHRASE="cli-rotation-pass")

    def cli(*args: str, code: int = 0) -> str:
        done = subprocess.run([FLEETGATE, *args], env=env, capture_output=True, text=True)
        assert done.returncode == code, done.stderr
        return done.stdout if code == 0 else done.stderr

    cli("ca", "init")
    csr = tmp_path / "line-1.csr"  # the station's key stays with the station
    request = station_csr("line-1", ec.generate_private_key(ec.SECP256R1()))
    csr.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    cli("station", "add", "line-1", "--csr", str(csr))
    first = json.loads(cli("ca", "status", "--json"))
    assert [(r["role"], r["state"]) for r in first] == [("root", "active"), ("issuing", "active")]
    assert "new issuing CA" in cli("ca", "rotate", "issuing")
    rows = json.loads(cli("ca", "status", "--json"))
    old = next(r for r in rows if r["role"] == "issuing" and r["state"] == "trusted")
    refusal = cli("ca", "retire", old["key_id"], code=1)
    assert refusal.count("\n") == 1 and "station:line-1" in refusal and "--force" in refusal
    forced = cli("ca", "retire", old["key_id"], "--force")
    assert "cut off 1 certificate(s)" in forced and "station:line-1" in forced
    assert "new root CA" in cli("ca", "rotate", "root")
    states = [(r["role"], r["state"]) for r in json.loads(cli("ca", "status", "--json"))]
    assert states.count(("cross", "trusted")) == 2
    assert states.count(("issuing", "active")) == 1


def test_each_issuing_ca_answers_ocsp_and_signs_a_crl_for_its_own_certificates(
    fleet: Fleet,
) -> None:
    old_cert = load_certificates(enroll(fleet, "sensor-1").cert)[0]
    old = fleet.service.ca.anchors.issuing
    new = rotation.rotate_issuing(fleet.config, fleet.registry, actor="admin:test")
    assert fleet.service.refresh_authorities()
    fleet.registry.revoke_station("line-1", "superseded", "admin:test")
    fleet.add_station("line-1")
    new_cert = load_certificates(enroll(fleet, "sensor-2").cert)[0]
    assert (old_cert.issuer, new_cert.issuer) == (old.subject, new.subject)
    crl_dp = new_cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert crl_dp[0].full_name[0].value.endswith(f"/crl/{authority_key_id(new)}")

    for cert, issuer in ((old_cert, old), (new_cert, new)):
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        der = fleet.service.ocsp_response(request.public_bytes(serialization.Encoding.DER))
        answer = ocsp.load_der_ocsp_response(der)
        assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert answer.responder_key_hash == bytes.fromhex(authority_key_id(issuer))
        issuer.public_key().verify(  # type: ignore[call-arg, union-attr]
            answer.signature, answer.tbs_response_bytes, ec.ECDSA(hashes.SHA256())
        )
    # A serial of the new CA asked of the old one: that CA never issued it.
    mixed = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        *_hashes(old), new_cert.serial_number, hashes.SHA1()
    )
    der = fleet.service.ocsp_response(mixed.build().public_bytes(serialization.Encoding.DER))
    assert ocsp.load_der_ocsp_response(der).certificate_status == ocsp.OCSPCertStatus.UNKNOWN

    fleet.service.change_device(
        "sensor-2", DeviceState.REVOKED, reason="keyCompromise", actor="admin:test"
    )
    paths = ca_paths(fleet.config)
    by_new = x509.load_der_x509_crl(paths.crl_of(authority_key_id(new)).read_bytes())
    by_old = x509.load_der_x509_crl(paths.crl.read_bytes())  # the first CA's, at ca.crl_url
    assert by_new.is_signature_valid(new.public_key())  # type: ignore[arg-type]
    assert by_old.is_signature_valid(old.public_key())  # type: ignore[arg-type]
    assert by_new.get_revoked_certificate_by_serial_number(new_cert.serial_number) is not None
    assert by_old.get_revoked_certificate_by_serial_number(new_cert.serial_number) is None


def _hashes(issuer: x509.Certificate) -> tuple[bytes, bytes]:
    name = hashes.Hash(hashes.SHA1())
    name.update(issuer.subject.public_bytes())
    return name.finalize(), bytes.fromhex(authority_key_id(issuer))


def test_after_a_root_rotation_server_certificates_verify_under_the_old_and_the_new_root(
    fleet: Fleet, tmp_path: Path
) -> None:
    old_root = tmp_path / "old-root.pem"
    old_root.write_bytes(ca_paths(fleet.config).root_cert.read_bytes())
    rotation.rotate_root(fleet.config, fleet.registry, actor="admin:test")
    credentials = ServerCredentials(tmp_path / "b.crt", tmp_path / "b.key", ("localhost",))
    ensure_server_certificate(fleet.config, credentials)  # as a broker on the CA host does
    leaf, *presented = load_certificates(credentials.cert)
    untrusted = tmp_path / "untrusted.pem"
    write_certificates(untrusted, presented)
    write_certificates(tmp_path / "leaf.pem", [leaf])
    for anchor in (old_root, ca_paths(fleet.config).root_cert):
        command = ["openssl", "verify", "-CAfile", str(anchor), "-untrusted", str(untrusted)]
        verified = subprocess.run(
            [*command, str(tmp_path / "leaf.pem")],
            capture_output=True,
            text=True,
        )
        assert verified.returncode == 0, verified.stderr


def test_a_rotation_without_the_root_key_is_refused_and_audited(fleet: Fleet) -> None:
    root_key = ca_paths(fleet.config).root_key
    root_key.rename(root_key.with_suffix(".offline"))  # moved offline, as the runbook suggests
    with pytest.raises(CAPassphraseError, match=r"root CA key .* is not on this host"):
        rotation.rotate_issuing(fleet.config, fleet.registry, actor="admin:test")
    refused = fleet.registry.audit_events(limit=100)[-1]
    assert (refused.action, refused.outcome) == ("ca.rotate.issuing", "refused")
    assert fleet.registry.authorities(include_retired=False)[-1].role == AuthorityRole.ISSUING


def test_automatic_renewal_moves_a_device_to_the_new_issuing_ca(
    fleet: Fleet, est_server: RunningServer, broker: RunningBroker, devices: Devices
) -> None:
    store = devices.enroll("sensor-1")
    first = store.certificates()[0]
    rotated = threading.Event()

    def clock() -> dt.datetime:
        """Seventy days on (past two thirds of 90) once the CA has rotated, until renewed."""
        now = dt.datetime.now(dt.UTC)
        renewed = store.certificates()[0].serial_number != first.serial_number
        return now + dt.timedelta(days=70) if rotated.is_set() and not renewed else now

    policy = RenewalPolicy(check_interval=0.05, clock=clock)
    client = devices.client(store, "sensor-1", broker, renewal=policy).start()
    client.wait_connected(10)
    issuing = rotation.rotate_issuing(fleet.config, fleet.registry, actor="admin:test")
    _picked_up(est_server, broker, issuing)
    rotated.set()
    wait_for(lambda: store.certificates()[0].issuer == issuing.subject, 15, "automatic renewal")
    _wait_on(client, store.certificates()[0])
    _publish_from_each({"sensor-1": client}, "after automatic renewal")
    assert _refusals(broker) == 0
    assert fleet.registry.active_devices_by_issuer()[issuer_key_id(first)] == 0
