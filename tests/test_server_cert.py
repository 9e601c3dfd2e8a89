"""`fleetgate ca server-cert`: a broker certificate for another host, which then runs keyless."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import stat
import subprocess

from broker_helpers import wait_for
from conftest import RunningServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from broker.tls import broker_credentials
from enrollment import profiles
from enrollment.ca import ca_paths, ensure_server_certificate
from fleetgate.cli import app
from fleetgate.config import load_config
from fleetgate.keyfiles import write_certificates, write_private_key


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


def _served_serial(port: int, root) -> int:
    context = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def _on_disk_serial(path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def test_a_running_enrollment_service_renews_its_own_certificate_when_due(fleet):
    server = RunningServer(fleet.config)
    server._server.certificate_check_interval_s = 0.1
    server.start()
    try:
        paths = ca_paths(fleet.config)
        # Swap in a certificate 10 days from expiry, as if the service had run for months.
        key = ec.generate_private_key(ec.SECP256R1())
        short = fleet.service.ca.issue(
            profiles.SERVER,
            profiles.server_subject(fleet.config.enrollment.server_names),
            key.public_key(),
            dt.timedelta(days=10),
        )
        write_private_key(paths.server_key, key)
        write_certificates(paths.server_cert, [short, fleet.service.ca.anchors.issuing])
        renewed = wait_for(
            lambda: (
                (serial := _on_disk_serial(paths.server_cert)) != short.serial_number and serial
            ),
            what="the due certificate to be renewed",
        )
        on_disk = x509.load_pem_x509_certificates(paths.server_cert.read_bytes())[0]
        assert on_disk.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
        # the reload follows the write within the same check: new handshakes get the new one
        wait_for(lambda: _served_serial(server.port, fleet.root) == renewed, what="the reload")
    finally:
        server.stop()
