"""`fleetgate device run`: a device agent from its data directory, against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from broker_helpers import MosquittoSub, enroll, running_broker  # noqa: F401 - the fixture
from card_helpers import (  # noqa: F401 - the fixtures
    PIN,
    card_fixture,
    card_maker_fixture,
    pcsc_fixture,
    trust_card_maker,
)
from cryptography import x509

from device_sdk import FileKeyStore
from device_sdk.agent import AgentConfigError, open_agent
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.provisioning import enroll as sdk_enroll
from device_sdk.smartcard_keystore import SmartcardKeyStore

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


def write_pin_file(path: Path, pin: str, mode: int = 0o600) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as file:
        file.write(pin + "\n")
    os.chmod(path, mode)


def test_device_agent_runs_from_a_smartcard_directory(fleet, est_server, broker, card, tmp_path):
    """A card directory: device.crt + ca.crt, no key file, [smartcard] naming the PIN file."""
    trust_card_maker(fleet, card.maker)
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "card-agent-1")
    directory = tmp_path / "card-agent-1"
    store = SmartcardKeyStore(directory, pin=PIN, reader="Virtual PCD")  # as device.toml says
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.chain.read_bytes()))
    enroll_smartcard(
        store, "card-agent-1", est_url=est_server.url, station_cert=station.cert,
        station_key=station.key,
    )  # fmt: skip
    store.close()  # the agent's process opens the card itself
    write_pin_file(directory / "card.pin", PIN)
    (directory / "device.toml").write_text(
        f'broker = "localhost:{broker.port}"\nest_url = "{est_server.url}"\n\n'
        '[smartcard]\nreader = "Virtual PCD"\npin_file = "card.pin"\n'
    )
    assert not [p.name for p in directory.iterdir() if p.name.startswith("device.key")]
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
        assert PIN not in result.stdout + result.stderr
        for seq in range(3):
            line = watcher.wait_line(
                lambda line: line.startswith("devices/card-agent-1/telemetry ")
            )
            assert json.loads(line.split(" ", 1)[1])["seq"] == seq
    finally:
        watcher.stop()


@pytest.mark.parametrize(
    ("table", "pin_mode", "message"),
    [
        ('pin_file = "card.pin"', 0o644, "chmod 600"),
        ('pin = "123456"', None, "a PIN does not belong in device.toml"),
        ('pin_env = "CARD_PIN_FOR_TEST"\npin_file = "card.pin"', 0o600, "exactly one PIN source"),
        ('pin_env = "CARD_PIN_NOT_SET"', None, "CARD_PIN_NOT_SET, which is not set"),
        ('pin_file = "missing.pin"', None, "cannot read the PIN file"),
    ],
)
def test_a_card_directory_refuses_an_unsafe_or_missing_pin(tmp_path, table, pin_mode, message):
    directory = tmp_path / "card-device"
    directory.mkdir()
    if pin_mode is not None:
        write_pin_file(directory / "card.pin", PIN, pin_mode)
    (directory / "device.toml").write_text(f"[smartcard]\n{table}\n")
    with pytest.raises(AgentConfigError, match=message):
        open_agent(directory)


def test_a_card_directory_takes_the_pin_from_the_environment(tmp_path, monkeypatch):
    directory = tmp_path / "card-device"
    directory.mkdir()
    (directory / "device.toml").write_text('[smartcard]\npin_env = "CARD_PIN_FOR_TEST"\n')
    monkeypatch.setenv("CARD_PIN_FOR_TEST", PIN)
    with pytest.raises(AgentConfigError, match="enroll the smartcard first"):
        open_agent(directory)  # past the PIN: the store opened, and found no certificate


def test_a_card_directory_with_a_key_file_is_refused(tmp_path):
    directory = tmp_path / "card-device"
    directory.mkdir()
    (directory / "device.key").write_text("")
    (directory / "device.toml").write_text('[smartcard]\npin_env = "CARD_PIN_FOR_TEST"\n')
    with pytest.raises(AgentConfigError, match="a device has one key"):
        open_agent(directory)
