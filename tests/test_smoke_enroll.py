"""The happy path end to end: a station enrolls a device over EST and openssl agrees."""

from __future__ import annotations

import subprocess

from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.est import device_csr


def test_station_enrolls_device_and_openssl_verifies_it(fleet, est_server):
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "sensor-1")
    key = ec.generate_private_key(ec.SECP256R1())
    with est_server.client(fleet.root, station.cert, station.key) as est:
        cert = est.simpleenroll(device_csr("sensor-1", key))
    cert_path, _ = fleet.write_device("sensor-1", key, cert)
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(fleet.chain), str(cert_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert fleet.registry.device("sensor-1").state == "active"
