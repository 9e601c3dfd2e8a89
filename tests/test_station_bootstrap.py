"""Stations make their own keys: a one-time bootstrap code redeemed over EST, and renewal.

The CA host sees only CSRs: no station key is ever written under its data directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Fleet, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.est import EstClient, EstError, client_context, device_csr, station_csr
from enrollment.registry import CertStatus, DeviceState, SubjectKind
from fleetgate.keyfiles import write_certificates, write_private_key

STATION = "line-7"
TTL = dt.timedelta(minutes=10)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _redeem(
    server: RunningServer, fleet: Fleet, code: str, station: str = STATION
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    with EstClient(server.url, client_context(fleet.root)) as est:
        return key, est.station_enroll(station_csr(station, key), station, code)


def _station_files(
    directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, fleet: Fleet
) -> tuple[Path, Path]:
    """The station's own store (not the CA's data directory)."""
    write_private_key(directory / "station.key", key)
    write_certificates(directory / "station.crt", [cert, fleet.service.ca.anchors.issuing])
    return directory / "station.crt", directory / "station.key"


def _audit(fleet: Fleet, action: str) -> list[tuple[str, str, str]]:
    return [
        (e.actor, e.outcome, e.reason)
        for e in fleet.registry.audit_events(limit=1000)
        if e.action == action
    ]


def test_a_station_enrolls_its_own_key_with_a_code_then_enrolls_a_device(
    fleet: Fleet, est_server: RunningServer, tmp_path: Path
) -> None:
    code = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    key, cert = _redeem(est_server, fleet, code)

    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:fleetgate:station:{STATION}"
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=8)
    assert not list(fleet.config.home.rglob("*station*.key"))  # the CA host never had it
    actor, outcome, reason = _audit(fleet, "station.enroll")[-1]
    assert (actor, outcome) == (f"bootstrap:{STATION}", "ok")
    assert f"serial {cert.serial_number:x}" in reason

    fleet.batch(STATION, "dev-1")
    context = client_context(fleet.root, *_station_files(tmp_path, key, cert, fleet))
    with EstClient(est_server.url, context) as est:
        est.simpleenroll(device_csr("dev-1", _new_key()))
    assert fleet.registry.device("dev-1").state == DeviceState.ACTIVE


def test_a_code_works_once_and_the_second_redemption_is_refused_and_audited(
    fleet: Fleet, est_server: RunningServer
) -> None:
    code = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    _redeem(est_server, fleet, code)
    with pytest.raises(EstError) as refused:
        _redeem(est_server, fleet, code)
    assert refused.value.status == 403
    assert "already used" in refused.value.message
    assert [c.status for c in fleet.registry.certificates_of(SubjectKind.STATION, STATION)] == [
        CertStatus.ACTIVE
    ]
    assert _audit(fleet, "station.enroll")[-1][1] == "refused"


@pytest.mark.parametrize(
    ("station", "code", "expected"),
    [
        (STATION, "wrong-code-0123456789", "no such bootstrap code"),
        ("line-8", None, "no such bootstrap code"),  # the right code, another station's name
        (STATION, "expired", "expired"),
    ],
    ids=["wrong-code", "other-station", "expired"],
)
def test_a_bad_code_is_refused_before_signing_and_audited(
    fleet: Fleet, est_server: RunningServer, station: str, code: str | None, expected: str
) -> None:
    good = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    if code == "expired":
        code = "an-expired-code-0123456"
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        fleet.registry.invite_station(
            "line-9", hashlib.sha256(code.encode()).hexdigest(), past, "test"
        )
        station = "line-9"
    with pytest.raises(EstError) as refused:
        _redeem(est_server, fleet, code or good, station)
    assert refused.value.status == 403
    assert expected in refused.value.message
    assert fleet.registry.certificates_of(SubjectKind.STATION, station) == []
    actor, outcome, reason = _audit(fleet, "station.enroll")[-1]
    assert (actor, outcome) == (f"bootstrap:{station}", "refused")
    assert expected in reason
    assert (code or good) not in reason


def test_a_request_without_basic_authentication_gets_401_and_is_audited(
    fleet: Fleet, est_server: RunningServer
) -> None:
    host, port = "localhost", int(est_server.url.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection(host, port, context=client_context(fleet.root))
    conn.request("POST", "/.well-known/est/station/simpleenroll", body=b"MIIB")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 401
    assert response.getheader("WWW-Authenticate", "").startswith("Basic ")
    assert _audit(fleet, "station.enroll")[-1][1] == "refused"


def test_a_station_renews_itself_over_est_and_its_old_certificate_stops_working(
    fleet: Fleet, est_server: RunningServer, tmp_path: Path
) -> None:
    code = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    key, cert = _redeem(est_server, fleet, code)
    old = client_context(fleet.root, *_station_files(tmp_path / "old", key, cert, fleet))
    new_key = _new_key()
    with EstClient(est_server.url, old) as est:
        renewed = est.simplereenroll(station_csr(STATION, new_key))
    assert renewed.public_key() == new_key.public_key()
    statuses = {
        c.serial: c.status for c in fleet.registry.certificates_of(SubjectKind.STATION, STATION)
    }
    assert statuses == {
        f"{cert.serial_number:x}": CertStatus.SUPERSEDED,
        f"{renewed.serial_number:x}": CertStatus.ACTIVE,
    }
    assert _audit(fleet, "station.reenroll")[-1][1] == "ok"

    fleet.batch(STATION, "dev-2", "dev-3")
    with EstClient(est_server.url, old) as est, pytest.raises(EstError) as refused:
        est.simpleenroll(device_csr("dev-2", _new_key()))
    assert refused.value.status == 403
    new = client_context(fleet.root, *_station_files(tmp_path / "new", new_key, renewed, fleet))
    with EstClient(est_server.url, new) as est:
        est.simpleenroll(device_csr("dev-3", _new_key()))


def test_a_station_may_renew_only_itself(
    fleet: Fleet, est_server: RunningServer, tmp_path: Path
) -> None:
    code = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    key, cert = _redeem(est_server, fleet, code)
    context = client_context(fleet.root, *_station_files(tmp_path, key, cert, fleet))
    with EstClient(est_server.url, context) as est, pytest.raises(EstError) as refused:
        est.simplereenroll(station_csr("line-1", _new_key()))
    assert refused.value.status == 403
    assert "must name the station (line-7)" in refused.value.message


def test_station_enroll_and_renew_commands_keep_the_key_on_the_station(
    fleet: Fleet, est_server: RunningServer, tmp_path: Path
) -> None:
    """`fleetgate station enroll` / `renew`, run on the station (here: another directory)."""
    fleetgate = str(Path(sys.executable).with_name("fleetgate"))
    code = fleet.service.invite_station(STATION, actor="test", ttl=TTL)
    station_dir = tmp_path / "on-the-station"
    common = ["--server", est_server.url, "--root", str(fleet.root), "--dir", str(station_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    enrolled = subprocess.run(
        [fleetgate, "station", "enroll", STATION, *common],
        env={**env, "FLEETGATE_STATION_CODE": code},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert code not in enrolled.stdout + enrolled.stderr
    assert (station_dir / "station.key").stat().st_mode & 0o777 == 0o600
    first = x509.load_pem_x509_certificates((station_dir / "station.crt").read_bytes())[0]
    renewed = subprocess.run(
        [fleetgate, "station", "renew", STATION, *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert renewed.returncode == 0, renewed.stderr
    second = x509.load_pem_x509_certificates((station_dir / "station.crt").read_bytes())[0]
    assert second.serial_number != first.serial_number
    assert second.public_key() != first.public_key()
    assert not list(fleet.config.home.rglob("station.key"))


def test_an_invalid_station_name_is_refused_without_auditing_it_verbatim(
    fleet: Fleet, est_server: RunningServer
) -> None:
    with pytest.raises(EstError) as refused:
        _redeem(est_server, fleet, "some-code-0123456789", "bad\nname")
    assert refused.value.status == 400
    assert _audit(fleet, "station.enroll")[-1][:2] == (
        "bootstrap:(invalid station id)",
        "refused",
    )
