"""`fleetgate sim --key-store tpm|smartcard`: a line of virtual hardware devices, end to end.

The CLI runs in a subprocess, as a user runs it: it manufactures swtpm + tpm2-abrmd TPMs or
pcscd + applet smartcards, enrolls them through the EST attestation endpoints, connects each
from its own process with DeviceClient, revokes one, and reports. The registry is then checked
directly. Also here: ``fleetgate device run`` from a TPM key store directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import MosquittoSub, RunningBroker, enroll, running_broker
from conftest import Fleet, RunningServer
from cryptography import x509
from tpm_helpers import ek_chain, trust_manufacturer

from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import enroll_tpm
from enrollment.registry import DeviceState, Registry
from firmware_sim.vtpm import TpmManufacturer, VirtualTpm
from fleetgate.config import Config

__all__ = ["running_broker"]

FLEETGATE = Path(sys.executable).with_name("fleetgate")
DEVICES = 2
MESSAGES = 3


def fleetgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, on the test's data directory (FLEETGATE_HOME)."""
    return subprocess.run(
        [str(FLEETGATE), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # gone meanwhile
            if text in cmdline:
                found.append(cmdline)
    return found


def run_line(config: Config, kind: str) -> dict[str, Any]:
    result = fleetgate(
        "sim",
        "--key-store",
        kind,
        "--devices",
        str(DEVICES),
        "--messages",
        str(MESSAGES),
        "--home-registry",  # on the fixture's data directory, so the test can read its registry
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.parametrize(
    ("kind", "group_hint"),
    [
        ("tpm", "enroll it through the TPM attestation flow"),
        ("smartcard", "enroll it with its smartcard's attestation"),
    ],
)
def test_a_hardware_line_enrolls_attested_publishes_and_kicks_the_revoked_device(
    config: Config, kind: str, group_hint: str
) -> None:
    report = run_line(config, kind)

    assert report["key_store"] == kind
    assert report["enrolled"] == report["connected"] == DEVICES
    sent = DEVICES * MESSAGES
    assert report["sent"] == report["acknowledged"] == report["delivered"] == sent
    assert report["commands_delivered"] == DEVICES
    assert report["revoked"] == report["kicked"] == 1
    assert 0 < report["revoke_to_kick_ms"]["p50"] < 5000
    refused = report["refused"]
    software = [r for r in refused if r.startswith(f"software-key enrollment into the {kind}-only")]
    assert len(software) == 1 and group_hint in software[0], refused
    assert "key_protection_required" in software[0]
    assert refused[software[0]] == 1
    assert refused == {
        software[0]: 1,
        "revoked device's session: the broker ended the session: Administrative action (0x98)": 1,
        "revoked device's reconnect: the broker refused the connection: Not authorized (0x87)": 1,
    }

    identities = report["identities"]
    assert [i["key_protection"] for i in identities] == [kind] * DEVICES
    bindings = {i["hardware_binding"] for i in identities}
    assert len(bindings) == DEVICES and all(len(b) == 64 for b in bindings)
    registry = Registry(config.database_url)
    try:
        for n, identity in enumerate(identities):
            device = registry.device(identity["device_id"])
            assert device.key_protection == kind
            assert device.hardware_binding == identity["hardware_binding"]
            assert device.state == (DeviceState.REVOKED if n == 0 else DeviceState.ACTIVE)
        run_id = identities[0]["device_id"].rsplit("-", 1)[0]
        assert registry.device(f"{run_id}-softkey").state == DeviceState.PENDING
    finally:
        registry.close()

    # The sim's manufacturer CA stayed out of the data directory's own trust stores ...
    for setting in (
        config.attestation.tpm_manufacturer_cas,
        config.attestation.card_manufacturer_cas,
    ):
        assert not any(config.data_path(setting).glob("*")), setting
    # ... and nothing it started outlived it (every path and bus name of a run names its id).
    assert processes_mentioning(run_id) == []


def test_a_hardware_line_refuses_more_devices_than_it_can_make(config: Config) -> None:
    result = fleetgate("sim", "--key-store", "tpm", "--devices", "21")
    assert result.returncode == 1
    assert "takes 1 to 20 devices, not 21" in result.stderr
    assert "--key-store file" in result.stderr
    assert not (config.home / "sim").exists()


def test_device_agent_runs_from_a_tpm_key_store(
    fleet: Fleet,
    est_server: RunningServer,
    broker: RunningBroker,
    vtpm: VirtualTpm,
    tpm_maker: TpmManufacturer,
    tmp_path: Path,
) -> None:
    trust_manufacturer(fleet, tpm_maker)
    station = fleet.add_station("line-1")
    fleet.batch("line-1", "tpm-agent-1")
    directory = tmp_path / "tpm-agent-1"
    store = TpmKeyStore(directory, tcti=vtpm.tcti)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.chain.read_bytes()))
    enroll_tpm(
        store,
        "tpm-agent-1",
        est_url=est_server.url,
        station_cert=station.cert,
        station_key=station.key,
        ek_chain=ek_chain(tpm_maker),
    )
    assert not (directory / "device.key").exists()
    toml = directory / "device.toml"
    toml.write_text(f'broker = "localhost:{broker.port}"\ntcti = "{vtpm.tcti}"\n')
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
        result = fleetgate("device", "run", str(directory), "--count", "3", "--interval", "0.05")
        assert result.returncode == 0, result.stderr
        assert "stopped after 3 message(s)" in result.stdout
        for seq in range(3):
            line = watcher.wait_line(lambda line: line.startswith("devices/tpm-agent-1/telemetry "))
            assert json.loads(line.split(" ", 1)[1])["seq"] == seq
    finally:
        watcher.stop()

    toml.write_text(
        f'broker = "localhost:{broker.port}"\n'
        'tcti = "tabrmd:bus_name=org.fleetgate.NoSuchTpm,bus_type=session"\n'
    )
    unreachable = fleetgate("device", "run", str(directory), "--count", "1")
    assert unreachable.returncode == 1
    last = unreachable.stderr.strip().splitlines()[-1]  # GLib warns on stderr first
    assert last.startswith("error: ") and "NoSuchTpm" in last
    assert "Traceback" not in unreachable.stderr
