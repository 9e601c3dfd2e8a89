"""The `fleetgate` admin CLI, driven as an operator would: the installed console script.

Every command runs in a subprocess against a temporary FLEETGATE_HOME. Every output is kept, and
after each test nothing the CLI printed or wrote under the data directory may hold the passphrase.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from device_sdk.est import device_csr, station_csr
from enrollment.ca import load_ca
from enrollment.registry import DeviceState, Registry, StationState, SubjectKind, schema
from enrollment.service import EnrollmentService
from fleetgate.config import load_config
from fleetgate.errors import CAPassphraseError
from fleetgate.keyfiles import load_private_key

PASSPHRASE = "cli-Secret-passphrase-7f3a9c"
WRONG_PASSPHRASE = "cli-Wrong-passphrase-51d2e8"
SECRETS = (PASSPHRASE, WRONG_PASSPHRASE)
FLEETGATE = Path(sys.executable).with_name("fleetgate")
NOT_INITIALISED = "run `fleetgate ca init`"


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Result:
        assert self.returncode == 0, f"fleetgate {' '.join(self.args)}: {self.stderr}"
        return self

    def failed(self) -> Result:
        """A refusal: exit 1, exactly one line on stderr, no traceback."""
        assert self.returncode == 1, f"fleetgate {' '.join(self.args)} exited {self.returncode}"
        assert "Traceback" not in self.stderr + self.stdout
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("error: ")
        return self

    def json(self):
        return json.loads(self.stdout)


class Cli:
    """Runs the console script against one data directory and keeps everything it printed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.outputs: list[str] = []

    def __call__(self, *args: str, passphrase: str | None = PASSPHRASE) -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
        env["FLEETGATE_HOME"] = str(self.home)
        if passphrase is not None:
            env["FLEETGATE_CA_PASSPHRASE"] = passphrase
        proc = subprocess.run(
            [str(FLEETGATE), *args], env=env, capture_output=True, text=True, timeout=60
        )
        self.outputs += [proc.stdout, proc.stderr]
        return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)

    def assert_no_secret_leaked(self) -> None:
        for secret in SECRETS:
            for output in self.outputs:
                assert secret not in output
            if self.home.exists():
                for path in self.home.rglob("*"):
                    if path.is_file():
                        assert secret.encode() not in path.read_bytes(), f"{secret} in {path}"


def _enroll(home: Path, station: str, device_id: str) -> x509.Certificate:
    """Enroll a device the way the EST endpoint would (the CLI has no command for it)."""
    with mock.patch.dict(os.environ, {"FLEETGATE_CA_PASSPHRASE": PASSPHRASE}):
        config = load_config(home, environ={})
        registry = Registry(config.database_url)
        try:
            service = EnrollmentService(load_ca(config), registry)
            pem = (home / "stations" / station / "station.crt").read_bytes()
            station_cert = x509.load_pem_x509_certificates(pem)[0]
            key = ec.generate_private_key(ec.SECP256R1())
            body = base64.b64encode(device_csr(device_id, key).public_bytes(Encoding.DER))
            return service.enroll(station_cert, body)
        finally:
            registry.close()


def _station_csr_file(
    directory: Path, station: str, encoding: Encoding = Encoding.PEM
) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    """The station's side of ``station add --csr``: its key stays here, its CSR goes to the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{station}.csr"
    path.write_bytes(station_csr(station, key).public_bytes(encoding))
    return path, key


@contextmanager
def _open_registry(home: Path) -> Iterator[Registry]:
    """The data directory's registry, opened in the test process to check what the CLI did."""
    registry = Registry(load_config(home, environ={}).database_url)
    try:
        yield registry
    finally:
        registry.close()


def _device(home: Path, device_id: str) -> tuple[str, list[tuple[str, str | None]]]:
    """A device's state and its certificates' (status, revocation reason)."""
    with _open_registry(home) as registry:
        state = registry.device(device_id).state.value
        certs = registry.certificates_of(SubjectKind.DEVICE, device_id)
        return state, [(c.status.value, c.revocation_reason) for c in certs]


def _device_ids(home: Path) -> set[str]:
    with _open_registry(home) as registry:
        return {d.id for d in registry.devices()}


def _crl_reasons(home: Path) -> dict[int, x509.ReasonFlags | None]:
    """Serial -> reason of every entry in the CRL the CLI last published (ca/crl.der)."""
    crl = x509.load_der_x509_crl((home / "ca" / "crl.der").read_bytes())
    reasons: dict[int, x509.ReasonFlags | None] = {}
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = None
        reasons[entry.serial_number] = reason
    return reasons


@dataclass(frozen=True)
class Template:
    """A CA, active stations line-1 and line-2, devices d1 and d2 enrolled by line-1, d3 pending."""

    home: Path
    serials: dict[str, str]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    home = tmp_path_factory.mktemp("template") / "fleet-data"
    cli = Cli(home)
    cli("ca", "init").ok()
    for station in ("line-1", "line-2"):
        csr, _key = _station_csr_file(home.parent, station)
        cli("station", "add", station, "--csr", str(csr)).ok()
    cli("batch", "add", "line-1", "d1", "d2", "d3").ok()
    serials = {d: format(_enroll(home, "line-1", d).serial_number, "x") for d in ("d1", "d2")}
    with _open_registry(home) as registry:
        serials["line-2"] = registry.certificates_of(SubjectKind.STATION, "line-2")[0].serial
    cli.assert_no_secret_leaked()
    return Template(home, serials)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Cli]:
    """An empty data directory."""
    cli = Cli(tmp_path / "fleet-data")
    yield cli
    cli.assert_no_secret_leaked()


@pytest.fixture
def fleet(template: Template, tmp_path: Path) -> Iterator[Cli]:
    """A private copy of the template data directory."""
    home = tmp_path / "fleet-data"
    shutil.copytree(template.home, home)
    cli = Cli(home)
    yield cli
    cli.assert_no_secret_leaked()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _openssl_serial(serial_hex: str) -> str:
    """A serial as `openssl crl -text` prints it: upper-case hex in whole octets."""
    digits = serial_hex.upper()
    return digits if len(digits) % 2 == 0 else "0" + digits


def _crl_text(crl_pem: bytes) -> str:
    proc = subprocess.run(
        ["openssl", "crl", "-noout", "-text"], input=crl_pem, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


# -- ca init -----------------------------------------------------------------------------------


def test_ca_init_writes_both_ca_keys_encrypted_and_owner_only(fresh):
    result = fresh("ca", "init").ok()
    ca_dir = fresh.home / "ca"
    assert str(ca_dir / "root.crt") in result.stdout
    assert _mode(ca_dir) == 0o700
    for name, cert_name in (("root.key", "root.crt"), ("issuing.key", "issuing.crt")):
        path = ca_dir / name
        assert _mode(path) == 0o600, name
        data = path.read_bytes()
        kdf_line, pem = data.split(b"\n", 1)
        assert kdf_line.startswith(b"Fleetgate-KDF: scrypt n=32768 r=8 p=1 salt="), name
        assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"), name
        key = load_private_key(path, PASSPHRASE.encode())
        cert = x509.load_pem_x509_certificate((ca_dir / cert_name).read_bytes())
        assert key.public_key() == cert.public_key()
        with pytest.raises(CAPassphraseError):
            load_private_key(path, WRONG_PASSPHRASE.encode())
        # The passphrase is stretched with scrypt: on its own it does not open the PKCS#8 file.
        with pytest.raises(ValueError):
            load_pem_private_key(pem, password=PASSPHRASE.encode())
        with pytest.raises(TypeError):
            load_pem_private_key(pem, password=None)
    assert _mode(ca_dir / "server.key") == 0o600
    assert (fresh.home / "fleetgate.toml").exists()
    assert (ca_dir / "crl.der").exists()
    with _open_registry(fresh.home) as registry:
        assert [(e.action, e.outcome) for e in registry.audit_events()] == [("ca.init", "ok")]


@pytest.mark.parametrize("passphrase", [None, "short"], ids=["unset", "too-short"])
def test_ca_init_without_a_usable_passphrase_fails_in_one_line_naming_the_variable(
    fresh, passphrase
):
    result = fresh("ca", "init", passphrase=passphrase).failed()
    assert "FLEETGATE_CA_PASSPHRASE" in result.stderr
    assert result.stdout == ""
    assert not (fresh.home / "ca" / "issuing.key").exists()
    assert not (fresh.home / "ca" / "root.key").exists()


def test_ca_init_twice_is_refused_unless_forced(fleet):
    root = (fleet.home / "ca" / "root.crt").read_bytes()
    result = fleet("ca", "init").failed()
    assert "--force" in result.stderr
    assert (fleet.home / "ca" / "root.crt").read_bytes() == root
    fleet("ca", "init", "--force").ok()
    assert (fleet.home / "ca" / "root.crt").read_bytes() != root


def test_ca_init_with_curve_p384_makes_a_p384_root_signing_with_sha384(fresh):
    fresh("ca", "init", "--curve", "P-384").ok()
    root = x509.load_pem_x509_certificate((fresh.home / "ca" / "root.crt").read_bytes())
    issuing = x509.load_pem_x509_certificate((fresh.home / "ca" / "issuing.crt").read_bytes())
    assert root.public_key().curve.name == "secp384r1"
    assert root.signature_hash_algorithm.name == "sha384"
    assert issuing.public_key().curve.name == "secp256r1"
    assert issuing.signature_hash_algorithm.name == "sha384"  # signed by the P-384 root


def test_ca_init_with_an_unknown_curve_is_refused_naming_it(fresh):
    result = fresh("ca", "init", "--curve", "P-521").failed()
    assert "P-521" in result.stderr
    assert not (fresh.home / "ca" / "issuing.key").exists()


def test_ca_show_json_describes_the_root_and_issuing_certificates(fleet):
    rows = fleet("ca", "show", "--json").ok().json()
    assert [row["role"] for row in rows] == ["root", "issuing"]
    for row, name in zip(rows, ("root.crt", "issuing.crt"), strict=True):
        cert = x509.load_pem_x509_certificate((fleet.home / "ca" / name).read_bytes())
        assert row["serial"] == format(cert.serial_number, "x")
        assert row["subject"] == cert.subject.rfc4514_string()
        assert row["key"] == "EC secp256r1"
    table = fleet("ca", "show").ok().stdout
    assert "ROLE" in table
    assert rows[0]["serial"] in table


def test_the_home_option_selects_the_data_directory(fleet, tmp_path):
    elsewhere = Cli(tmp_path / "empty")
    result = elsewhere("--home", str(fleet.home), "ca", "show", "--json").ok()
    assert len(result.json()) == 2


# -- stations ----------------------------------------------------------------------------------


def test_station_add_signs_the_stations_csr_and_writes_no_key_on_the_ca_host(fleet, tmp_path):
    csr, key = _station_csr_file(tmp_path, "line-3", Encoding.DER)
    fleet("station", "add", "line-3", "--csr", str(csr)).ok()
    directory = fleet.home / "stations" / "line-3"
    assert sorted(p.name for p in directory.iterdir()) == ["station.crt"]
    assert not [p for p in fleet.home.rglob("*.key") if "station" in p.name]
    cert, issuing = x509.load_pem_x509_certificates((directory / "station.crt").read_bytes())
    assert key.public_key() == cert.public_key()
    assert issuing == x509.load_pem_x509_certificate(
        (fleet.home / "ca" / "issuing.crt").read_bytes()
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:fleetgate:station:line-3"
    ]
    rows = {row["id"]: row for row in fleet("station", "list", "--json").ok().json()}
    assert set(rows) == {"line-1", "line-2", "line-3"}
    assert rows["line-3"]["state"] == "active"
    assert rows["line-3"]["certificate"] == format(cert.serial_number, "x")


def test_station_add_refuses_a_csr_naming_another_station(fleet, tmp_path):
    csr, _key = _station_csr_file(tmp_path, "line-4")
    result = fleet("station", "add", "line-5", "--csr", str(csr)).failed()
    assert "must name the station (line-5)" in result.stderr
    with _open_registry(fleet.home) as registry:
        assert "line-5" not in {s.id for s in registry.stations()}


def test_station_add_without_a_csr_prints_a_one_time_code_and_stores_only_its_hash(fleet):
    result = fleet("station", "add", "line-6", "--code-ttl", "5").ok()
    code = result.stdout.splitlines()[1]
    assert len(code) >= 22
    assert not (fleet.home / "stations" / "line-6").exists()
    for path in fleet.home.rglob("*"):
        if path.is_file():
            assert code.encode() not in path.read_bytes(), path
    with _open_registry(fleet.home) as registry:
        assert registry.station("line-6").state == StationState.ACTIVE
        assert registry.certificates_of(SubjectKind.STATION, "line-6") == []
        assert registry.audit_events(subject="line-6")[-1].action == "station.add"


def test_station_add_with_an_invalid_name_is_refused_with_the_id_rule(fleet):
    result = fleet("station", "add", "line/3").failed()
    assert "1-64 characters" in result.stderr
    assert not (fleet.home / "stations" / "line").exists()


def test_station_add_twice_is_refused_while_the_station_is_active(fleet):
    result = fleet("station", "add", "line-1").failed()
    assert "line-1" in result.stderr


def test_station_revoke_lists_it_in_the_crl_and_stops_new_batches(fleet, template):
    fleet("station", "revoke", "line-2", "--reason", "cessationOfOperation").ok()
    with _open_registry(fleet.home) as registry:
        assert registry.station("line-2").state == StationState.REVOKED
        assert registry.station("line-1").state == StationState.ACTIVE
    assert _crl_reasons(fleet.home) == {
        int(template.serials["line-2"], 16): x509.ReasonFlags.cessation_of_operation
    }
    assert "already revoked" in fleet("station", "revoke", "line-2").failed().stderr
    assert "line-2" in fleet("batch", "add", "line-2", "x1").failed().stderr


def test_station_revoke_with_an_unknown_reason_lists_the_valid_ones(fleet):
    result = fleet("station", "revoke", "line-1", "--reason", "tired").failed()
    assert "keyCompromise" in result.stderr
    with _open_registry(fleet.home) as registry:
        assert registry.station("line-1").state == StationState.ACTIVE


# -- batches -----------------------------------------------------------------------------------


def test_batch_add_registers_pending_devices_in_their_group(fleet):
    result = fleet("batch", "add", "line-1", "b1", "b2", "--group", "meters", "--label", "wo-7")
    assert "2 device(s)" in result.ok().stdout
    with _open_registry(fleet.home) as registry:
        added = [d for d in registry.devices() if d.id.startswith("b")]
    assert [(d.id, d.state, d.group, d.station_id) for d in added] == [
        ("b1", DeviceState.PENDING, "meters", "line-1"),
        ("b2", DeviceState.PENDING, "meters", "line-1"),
    ]


def test_batch_add_with_one_taken_id_adds_none_of_them(fleet):
    result = fleet("batch", "add", "line-1", "b1", "d1", "b2").failed()
    assert "d1" in result.stderr
    assert _device_ids(fleet.home) == {"d1", "d2", "d3"}


def _write_csv(path: Path, rows: list[tuple[str, ...]], header=("station", "device_id", "group")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_batch_import_adds_one_batch_per_station_and_group(fleet, tmp_path):
    path = _write_csv(
        tmp_path / "batch.csv",
        [("line-1", "m1", "meters"), ("line-1", "m2", "meters"), ("line-2", "v1", "valves")],
    )
    result = fleet("batch", "import", str(path)).ok()
    assert "station line-1 may enroll 2 device(s) in group meters" in result.stdout
    assert "station line-2 may enroll 1 device(s) in group valves" in result.stdout
    with _open_registry(fleet.home) as registry:
        added = {d.id: d for d in registry.devices()}
    assert (added["m1"].group, added["m1"].station_id) == ("meters", "line-1")
    assert (added["m2"].group, added["m2"].station_id) == ("meters", "line-1")
    assert (added["v1"].group, added["v1"].station_id, added["v1"].state) == (
        "valves",
        "line-2",
        DeviceState.PENDING,
    )


def test_batch_import_without_a_group_column_uses_the_default_group(fleet, tmp_path):
    path = _write_csv(tmp_path / "b.csv", [("line-1", "n1")], header=("station", "device_id"))
    fleet("batch", "import", str(path)).ok()
    with _open_registry(fleet.home) as registry:
        assert registry.device("n1").group == "default"


@pytest.mark.parametrize(
    "rows",
    [
        [("line-1", "m1", "meters"), ("line-1", "m2", "valves"), ("line-1", "d1", "valves")],
        [("line-1", "m1", "meters"), ("line-1", "m2", "valves"), ("line-1", "m1", "valves")],
        [("line-1", "m1", "meters"), ("line-1", "m2", "valves"), ("line-1", "m/3", "valves")],
        [("line-1", "m1", "meters"), ("line-9", "m2", "valves")],
    ],
    ids=["already-registered", "listed-twice", "invalid-id", "unknown-station"],
)
def test_batch_import_with_one_bad_row_imports_nothing(fleet, tmp_path, rows):
    path = _write_csv(tmp_path / "batch.csv", rows)
    fleet("batch", "import", str(path)).failed()
    assert _device_ids(fleet.home) == {"d1", "d2", "d3"}


def test_batch_import_of_a_missing_file_fails_in_one_line(fleet, tmp_path):
    result = fleet("batch", "import", str(tmp_path / "absent.csv")).failed()
    assert "absent.csv" in result.stderr


# -- devices -----------------------------------------------------------------------------------


def test_device_list_json_shows_every_device_and_filters_by_state(fleet):
    rows = fleet("device", "list", "--json").ok().json()
    assert [(r["id"], r["state"], r["group"], r["station"]) for r in rows] == [
        ("d1", "active", "default", "line-1"),
        ("d2", "active", "default", "line-1"),
        ("d3", "pending", "default", "line-1"),
    ]
    table = fleet("device", "list", "--state", "pending").ok().stdout.splitlines()
    assert table[0].split() == ["ID", "GROUP", "STATE", "STATION", "UPDATED"]
    assert [line.split()[:4] for line in table[1:]] == [["d3", "default", "pending", "line-1"]]


def test_device_show_lists_the_device_and_its_certificate(fleet, template):
    info = fleet("device", "show", "d1", "--json").ok().json()
    assert (info["id"], info["state"], info["station"]) == ("d1", "active", "line-1")
    [cert] = info["certificates"]
    assert cert["serial"] == template.serials["d1"]
    assert cert["status"] == "active"
    assert len(cert["sha256"]) == 64
    human = fleet("device", "show", "d1").ok().stdout
    assert template.serials["d1"] in human
    assert "active" in human


def test_device_show_of_an_unknown_id_fails_naming_it(fleet):
    assert "no device 'ghost'" in fleet("device", "show", "ghost").failed().stderr


def test_suspend_then_reinstate_moves_the_certificate_on_hold_and_back(fleet, template):
    serial = int(template.serials["d1"], 16)
    fleet("device", "suspend", "d1").ok()
    assert _device(fleet.home, "d1") == ("suspended", [("on_hold", "certificateHold")])
    assert _crl_reasons(fleet.home) == {serial: x509.ReasonFlags.certificate_hold}

    fleet("device", "reinstate", "d1").ok()
    assert _device(fleet.home, "d1") == ("active", [("active", None)])
    assert _crl_reasons(fleet.home) == {}


def test_revoke_with_a_reason_is_final_and_audited(fleet, template):
    result = fleet("device", "revoke", "d1", "--reason", "keyCompromise").ok()
    assert "revoked (keyCompromise)" in result.stdout
    assert _device(fleet.home, "d1") == ("revoked", [("revoked", "keyCompromise")])
    assert _crl_reasons(fleet.home) == {
        int(template.serials["d1"], 16): x509.ReasonFlags.key_compromise
    }
    assert "final" in fleet("device", "revoke", "d1", "--reason", "keyCompromise").failed().stderr
    assert "final" in fleet("device", "reinstate", "d1").failed().stderr
    assert _device(fleet.home, "d1") == ("revoked", [("revoked", "keyCompromise")])
    assert _device(fleet.home, "d2")[0] == "active"
    with _open_registry(fleet.home) as registry:
        events = registry.audit_events(subject="d1")
    assert [(e.action, e.outcome) for e in events] == [
        ("enroll", "ok"),
        ("device.revoke", "ok"),
        ("device.revoke", "refused"),
        ("device.reinstate", "refused"),
    ]
    assert all(e.actor.startswith("admin:") for e in events[1:])


def test_revoke_with_an_unknown_reason_lists_the_valid_ones_and_changes_nothing(fleet):
    result = fleet("device", "revoke", "d1", "--reason", "becauseISaidSo").failed()
    assert "becauseISaidSo" in result.stderr
    for reason in ("keyCompromise", "superseded", "cessationOfOperation", "unspecified"):
        assert reason in result.stderr
    assert _device(fleet.home, "d1") == ("active", [("active", None)])


def test_reinstating_an_active_device_is_refused(fleet):
    assert "active" in fleet("device", "reinstate", "d1").failed().stderr


# -- crl and audit -----------------------------------------------------------------------------


def test_crl_export_pem_is_signed_by_the_issuing_ca_and_lists_the_revoked_serial(fleet, template):
    with _open_registry(fleet.home) as registry:
        registry.change_device_state("d1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
        registry.change_device_state("d2", DeviceState.SUSPENDED, reason="lost", actor="t")
    pem = fleet("crl", "export", "--pem").ok().stdout.encode()
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    text = _crl_text(pem)
    assert f"Serial Number: {_openssl_serial(template.serials['d1'])}" in text
    assert "Key Compromise" in text
    assert f"Serial Number: {_openssl_serial(template.serials['d2'])}" in text
    assert "Certificate Hold" in text
    verify = subprocess.run(
        ["openssl", "crl", "-noout", "-CAfile", str(fleet.home / "ca" / "chain.pem")],
        input=pem,
        capture_output=True,
        timeout=30,
    )
    assert verify.returncode == 0
    assert b"verify OK" in verify.stdout + verify.stderr


def test_crl_export_to_a_file_writes_der(fleet, template, tmp_path):
    with _open_registry(fleet.home) as registry:
        registry.change_device_state("d2", DeviceState.REVOKED, reason="superseded", actor="t")
    out = tmp_path / "fleet.crl"
    result = fleet("crl", "export", "--out", str(out)).ok()
    assert "1 entries" in result.stderr
    assert result.stdout == ""
    crl = x509.load_der_x509_crl(out.read_bytes())
    assert [entry.serial_number for entry in crl] == [int(template.serials["d2"], 16)]


def test_audit_for_a_device_shows_its_events_oldest_first(fleet):
    with _open_registry(fleet.home) as registry:
        registry.change_device_state("d1", DeviceState.SUSPENDED, reason="lost", actor="admin:a")
        registry.change_device_state(
            "d1", DeviceState.REVOKED, reason="keyCompromise", actor="admin:b"
        )
        registry.change_device_state("d2", DeviceState.SUSPENDED, reason="other", actor="admin:a")
    fleet("device", "reinstate", "d1").failed()
    events = fleet("audit", "--device", "d1", "--json").ok().json()
    assert [(e["action"], e["outcome"]) for e in events] == [
        ("enroll", "ok"),
        ("device.suspend", "ok"),
        ("device.revoke", "ok"),
        ("device.reinstate", "refused"),
    ]
    assert {e["subject"] for e in events} == {"d1"}
    assert events[0]["actor"] == "station:line-1"
    assert [e["actor"] for e in events[1:3]] == ["admin:a", "admin:b"]
    assert events[3]["actor"].startswith("admin:")
    assert events[2]["reason"] == "keyCompromise"
    assert "final" in events[3]["reason"]


# -- the passphrase ------------------------------------------------------------------------------


def test_a_wrong_passphrase_is_refused_audited_and_changes_nothing(fleet):
    result = fleet(
        "device", "revoke", "d1", "--reason", "keyCompromise", passphrase=WRONG_PASSPHRASE
    )
    assert "FLEETGATE_CA_PASSPHRASE" in result.failed().stderr
    assert _device(fleet.home, "d1") == ("active", [("active", None)])
    events = fleet("audit", "--json").ok().json()
    unlock = [e for e in events if e["action"] == "ca.unlock"]
    assert len(unlock) == 1
    assert unlock[0]["outcome"] == "refused"
    assert "FLEETGATE_CA_PASSPHRASE" in unlock[0]["reason"]


def test_a_missing_passphrase_is_refused_naming_the_variable(fleet):
    result = fleet("device", "suspend", "d1", passphrase=None).failed()
    assert "FLEETGATE_CA_PASSPHRASE" in result.stderr
    assert _device(fleet.home, "d1") == ("active", [("active", None)])


def test_read_only_commands_need_no_passphrase(fleet):
    fleet("ca", "show", passphrase=None).ok()
    assert len(fleet("device", "list", "--json", passphrase=None).ok().json()) == 3


@pytest.mark.parametrize(
    "args",
    [
        ("ca", "show"),
        ("station", "add", "line-1"),
        ("device", "revoke", "d1"),
        ("audit",),
    ],
    ids=lambda args: "-".join(args),
)
def test_commands_before_ca_init_say_to_run_it(fresh, args):
    result = fresh(*args).failed()
    assert NOT_INITIALISED in result.stderr
    assert not (fresh.home / "registry.db").exists()


def test_no_secret_reaches_any_output_or_the_logs(fleet):
    """A served session logs to <home>/logs; neither the logs nor any output hold a passphrase.

    (Every other test in this file ends with the same check over its own outputs and files.)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env |= {"FLEETGATE_HOME": str(fleet.home), "FLEETGATE_CA_PASSPHRASE": PASSPHRASE}
    server = subprocess.Popen(
        [str(FLEETGATE), "serve", "enrollment", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log_file = fleet.home / "logs" / "fleetgate.log"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "listening" not in _read(log_file):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.1)
        assert "listening" in _read(log_file)
        time.sleep(0.3)  # let run_forever install its SIGTERM handler after start() returns
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=20)
    fleet.outputs += [stdout, stderr]
    assert server.returncode == 0, stderr
    assert "stopped" in _read(log_file)

    bad_env = env | {"FLEETGATE_CA_PASSPHRASE": WRONG_PASSPHRASE}
    proc = subprocess.run(
        [str(FLEETGATE), "serve", "enrollment", "--port", "0"],
        env=bad_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    fleet.outputs += [proc.stdout, proc.stderr]
    assert proc.returncode == 1
    assert "FLEETGATE_CA_PASSPHRASE" in proc.stderr

    assert fleet.outputs
    assert [p.name for p in (fleet.home / "logs").iterdir()] == ["fleetgate.log"]
    fleet.assert_no_secret_leaked()  # also checked after every test; here with logs present


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_refused_admin_command_leaves_an_audit_entry(fleet):
    fleet("batch", "add", "no-such-station", "d9").failed()
    fleet("device", "revoke", "d1", "--reason", "bogus").failed()
    with _open_registry(fleet.home) as registry:
        refused = [(e.action, e.reason) for e in registry.audit_events() if e.outcome == "refused"]
    assert ("cli.batch.add", refused[-2][1]) == refused[-2]
    assert "no-such-station" in refused[-2][1]
    assert refused[-1][0] == "cli.device.revoke"
    assert "bogus" in refused[-1][1]


def test_files_the_cli_creates_are_private_to_their_owner(fresh):
    fresh("ca", "init").ok()
    assert _mode(fresh.home / "registry.db") == 0o600
    assert _mode(fresh.home / "fleetgate.toml") == 0o600
    assert _mode(fresh.home / "ca" / "crl.der") == 0o644  # published on purpose


def test_the_enrollment_service_audits_a_wrong_passphrase_and_does_not_start(fleet):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(FLEETGATE_HOME=str(fleet.home), FLEETGATE_CA_PASSPHRASE=WRONG_PASSPHRASE)
    proc = subprocess.run(
        [str(FLEETGATE), "serve", "enrollment", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "FLEETGATE_CA_PASSPHRASE" in proc.stderr
    with _open_registry(fleet.home) as registry:
        last = registry.audit_events()[-1]
    assert (last.actor, last.action, last.outcome) == ("service:enrollment", "ca.unlock", "refused")


def test_the_audited_command_path_skips_the_home_option_and_its_value():
    from fleetgate.cli import _command_words

    assert _command_words(["--home", "/x", "device", "show", "nosuch"]) == ["device", "show"]
    assert _command_words(["batch", "add", "--group", "g", "s1", "d1"]) == ["batch", "add"]


# -- db ----------------------------------------------------------------------------------------

MAIN_SQLITE = Path(__file__).parent / "fixtures" / "registry_main_sqlite.sql"
UPGRADE_HINT = "run `fleetgate db upgrade`"


def _registry_main_made(home: Path) -> None:
    """Swap the data directory's registry for one made by main (no schema version)."""
    import sqlite3

    (home / "registry.db").unlink()
    with sqlite3.connect(home / "registry.db") as db:
        db.executescript(MAIN_SQLITE.read_text())
        db.execute("INSERT INTO station VALUES ('line-9', 'ACTIVE', '2026-11-01 08:00:00')")


def test_ca_init_creates_the_registry_schema_and_db_status_says_it_is_current(fresh):
    fresh("ca", "init").ok()
    assert fresh("db", "status").ok().stdout.strip() == (
        f"the registry schema is at revision {schema.HEAD}, the current one"
    )
    assert fresh("db", "status", "--json").ok().json() == {
        "revision": schema.HEAD,
        "head": schema.HEAD,
        "current": True,
    }
    assert f"already at revision {schema.HEAD}" in fresh("db", "upgrade").ok().stdout


@pytest.mark.parametrize(
    "args",
    [("station", "list"), ("audit",), ("serve", "broker"), ("serve", "enrollment")],
    ids=lambda args: "-".join(args),
)
def test_every_process_refuses_a_registry_main_made_until_db_upgrade_adopts_it(fleet, args):
    _registry_main_made(fleet.home)
    result = fleet(*args).failed()
    assert UPGRADE_HINT in result.stderr and "before versioned schema migrations" in result.stderr
    assert "adopt" in fleet("db", "status").ok().stdout

    assert "adopted" in fleet("db", "upgrade").ok().stdout

    assert "line-9" in fleet("station", "list").ok().stdout
    (event,) = [e for e in fleet("audit", "--json").ok().json() if e["action"] == "db.upgrade"]
    assert "adopted" in event["reason"]


def test_db_grant_prints_each_roles_sql_and_needs_postgresql_to_run_it(fleet):
    printed = fleet(
        "db",
        "grant",
        "--broker-role",
        "fleet_broker",
        "--enrollment-role",
        "fleet_enroll",
        "--print",
    ).ok()
    lines = printed.stdout.splitlines()
    assert (
        "GRANT SELECT ON aclrule, auditanchor, certauthority, certificate, device, devicechange, "
        "alembic_version TO fleet_broker;"
    ) in lines
    assert "GRANT INSERT ON auditevent TO fleet_broker;" in lines
    assert not any("UPDATE" in line and "fleet_broker" in line for line in lines)
    result = fleet("db", "grant", "--broker-role", "b", "--enrollment-role", "e").failed()
    assert "only on PostgreSQL" in result.stderr
    bad = fleet("db", "grant", "--broker-role", "b; DROP", "--enrollment-role", "e", "--print")
    assert "role name" in bad.failed().stderr


def test_acl_set_refuses_a_template_the_broker_would_and_stores_nothing(fleet):
    result = fleet("acl", "set", "meters", "--publish", "meters/x%d/#", "--subscribe", "m/%d")
    assert "%d must be a whole topic level" in result.failed().stderr
    assert "default" in fleet("acl", "show", "meters").ok().stdout


def test_device_move_changes_the_group_and_audits_who_and_old_to_new(fleet, template):
    fleet("acl", "set", "meters", "--publish", "meters/%d/#", "--subscribe", "meters/%d/in").ok()
    result = fleet("device", "move", "d1", "--group", "meters").ok()
    assert "moved from group default to meters" in result.stdout
    assert fleet("device", "show", "d1", "--json").ok().json()["group"] == "meters"
    with _open_registry(fleet.home) as registry:
        [moved] = [e for e in registry.audit_events(subject="d1") if e.action == "device.move"]
        [acl] = [e for e in registry.audit_events(subject="meters") if e.action == "acl.set"]
    assert (moved.outcome, moved.reason) == ("ok", "group default -> meters")
    assert moved.actor.startswith("admin:")
    assert "(was the default)" in acl.reason
    fleet("device", "move", "d1", "--group", "default").ok()  # back: default always exists


@pytest.mark.parametrize(
    ("device", "group", "says"),
    [
        ("ghost", "default", "no device 'ghost' in the registry"),
        ("d1", "meterz", "no group 'meterz': give it an ACL first with `fleetgate acl set meterz"),
        ("d1", "default", "device d1 is already in group default"),
        ("d1", "bad group!", "group"),
    ],
)
def test_device_move_errors_clearly_and_changes_nothing(fleet, template, device, group, says):
    assert says in fleet("device", "move", device, "--group", group).failed().stderr
    assert fleet("device", "show", "d1", "--json").ok().json()["group"] == "default"
    with _open_registry(fleet.home) as registry:
        assert not [c for c in registry.changes_since(0) if c.group is not None]


def test_serve_enrollment_with_several_workers_is_refused_on_sqlite(fleet):
    result = fleet("serve", "enrollment", "--workers", "2").failed()
    assert "--workers 2 needs a PostgreSQL registry" in result.stderr
