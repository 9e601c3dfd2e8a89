"""`fleetgate device run`: a device agent from its data directory, against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from broker_helpers import MosquittoSub, enroll, running_broker  # noqa: F401 - the fixture
from cryptography import x509

from device_sdk import FileKeyStore
from device_sdk.provisioning import enroll as sdk_enroll

FLEETGATE = Path(sys.executable).with_name("fleetgate")


def provision(fleet, est_server, directory: Path, device_id: str, broker_port: int) -> None:
    """What a factory station leaves on the device: key store, certificate, device.toml."""
    station = fleet.add_station("line-1")
    fleet.batch("line-1", device_id)
    store = FileKeyStore(directory)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.chain.read_bytes()))
    sdk_enroll(
        store, device_id, est_url=est_server.url, station_cert=station.cert, station_key=station.key
    )
    (directory / "device.toml").write_text(f'broker = "localhost:{broker_port}"\n')


def run_agent(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    return subprocess.run(
        [str(FLEETGATE), "device", "run", str(directory), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_device_agent_streams_telemetry_from_its_directory(fleet, est_server, broker, tmp_path):
    directory = tmp_path / "sensor-1"
    provision(fleet, est_server, directory, "sensor-1", broker.port)
    watcher_creds = enroll(fleet, "ops-1", group="controllers")
    fleet.registry.set_acl(
        "controllers",
        publish=["devices/+/commands/#"],
        subscribe=["devices/+/telemetry"],
        actor="t",
    )
    watcher = MosquittoSub(broker, watcher_creds, "-t", "devices/+/telemetry", "-v")
    try:
        watcher.wait_line(lambda line: "received SUBACK" in line)
        result = run_agent(directory, "--count", "3", "--interval", "0.05")
        assert result.returncode == 0, result.stderr
        assert "stopped after 3 message(s)" in result.stdout
        for seq in range(3):
            line = watcher.wait_line(lambda line: line.startswith("devices/sensor-1/telemetry "))
            assert json.loads(line.split(" ", 1)[1])["seq"] == seq
    finally:
        watcher.stop()


def test_device_agent_without_a_certificate_says_to_enroll_first(tmp_path):
    result = run_agent(tmp_path / "empty")
    assert result.returncode == 1
    assert "enroll the device first" in result.stderr
    assert "Traceback" not in result.stderr
