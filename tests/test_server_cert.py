"""`fleetgate ca server-cert`: a broker certificate for another host, which then runs keyless."""

from __future__ import annotations

import shutil
import stat
import subprocess

from cryptography import x509
from typer.testing import CliRunner

from broker.tls import broker_credentials
from enrollment.ca import ensure_server_certificate
from enrollment.cli import app
from enrollment.config import load_config


def test_a_certificate_issued_for_another_host_lets_it_run_without_the_ca_key(fleet, tmp_path):
    out = tmp_path / "broker-2"
    result = CliRunner().invoke(
        app,
        ["--home", str(fleet.config.home), "ca", "server-cert", "--name", "mqtt-2.example",
         "--name", "10.0.0.7", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificates((out / "broker.crt").read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt-2.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert stat.S_IMODE((out / "broker.key").stat().st_mode) == 0o600
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(fleet.root), "-untrusted", str(out / "chain.pem"),
         "-purpose", "sslserver", str(out / "broker.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr

    # The other host: public CA files and the issued credentials, no issuing key, no passphrase.
    remote = load_config(
        tmp_path / "remote-home",
        environ={"FLEETGATE_BROKER_SERVER_NAMES": "mqtt-2.example,10.0.0.7"},
    )
    remote.ca_dir.mkdir(parents=True)
    for name in ("broker.crt", "broker.key", "chain.pem"):
        shutil.copy(out / name, remote.ca_dir / name)
    credentials = broker_credentials(remote)
    assert ensure_server_certificate(remote, credentials) == credentials  # current: no CA needed
    assert not (remote.ca_dir / "issuing.key").exists()
