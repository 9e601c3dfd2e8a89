"""tpm and smartcard groups inside a scenario, on real stand-ins: swtpm + tpm2-abrmd and
pcscd + vpcd + the PIV applet, one per device.

Each hardware device makes its key in its TPM or on its card, enrolls by attestation over EST,
connects with mutual TLS signed by the hardware, and then lives the scenario like the file-key
devices beside it, in two shard processes: its messages carry the engine's sequence payloads,
count as sent, acknowledged and delivered, and keep the invariants; the broker's restart makes
it reconnect, and so does churn; a revocation kicks it and refuses its reconnect.
"""

from __future__ import annotations

import asyncio
import shutil

from test_sim_hardware import processes_mentioning

from enrollment.registry import DeviceState, Registry
from firmware_sim.engine import Coordinator
from firmware_sim.scenario import parse_scenario
from firmware_sim.summary import summary
from fleetgate.config import load_config

TPM, CARD, FILE = 2, 2, 6

SCENARIO = {
    "name": "hardware-lines",
    "seed": 4,
    "drain_s": 4,
    "groups": [
        {"name": "sensors", "devices": FILE, "rate": 2.0, "reconnect_max_s": 2},
        {"name": "tpms", "devices": TPM, "key_store": "tpm", "rate": 2.0, "reconnect_max_s": 2},
        {
            "name": "cards",
            "devices": CARD,
            "key_store": "smartcard",
            "rate": 2.0,
            "mqtt": 3,
            "payload_bytes": 100,
            "reconnect_max_s": 2,
        },
    ],
    "stages": [
        {"name": "ramp", "duration_s": 3, "connect_rate": 10},
        {"name": "steady", "duration_s": 15, "churn": 0.03},
    ],
    "faults": [
        {"kind": "broker-restart", "at_s": 6, "duration_s": 1},
        {"kind": "revoke", "at_s": 13, "group": "tpms", "percent": 50},
    ],
}


def test_tpm_and_smartcard_lines_live_the_scenario_beside_file_key_devices() -> None:
    scenario = parse_scenario(SCENARIO)
    result = asyncio.run(Coordinator(scenario, procs=2, keep=True).run())
    assert result.data_dir is not None
    try:
        obs = result.obs
        assert [v.line() for v in result.violations] == []
        # (a note on a stage's pace says the machine was short of CPU; any other is a failure)
        assert [n for n in result.notes if not n.startswith("stage ")] == []

        # every hardware device enrolled by attestation and connected with its hardware key
        assert sorted(obs.hardware.values()) == ["smartcard"] * CARD + ["tpm"] * TPM
        for kind, devices in (("tpm", TPM), ("smartcard", CARD), ("file", FILE)):
            counts = obs.by_key_store[kind]
            assert counts["enrolled"] == counts["connected"] == devices, (kind, counts)
            # connected, then back after the broker's restart (and a revoked one refused)
            assert counts["connects"] >= 2 * devices, (kind, counts)
            assert counts["acknowledged"] >= 10 * devices, (kind, counts)
        config = load_config(result.data_dir)
        registry = Registry(config.database_url)
        try:
            for device_id, kind in obs.hardware.items():
                device = registry.device(device_id)
                assert device.key_protection == kind
                assert device.hardware_binding
                revoked_now = device_id in obs.revoked_at
                assert device.state == (DeviceState.REVOKED if revoked_now else DeviceState.ACTIVE)
        finally:
            registry.close()

        # their messages are the engine's: acknowledged, delivered to the backend, none lost
        for device_id in obs.hardware:
            topic = f"devices/{device_id}/telemetry"
            acked = set(obs.acked[topic])
            delivered = {
                seq for (sub, t), seqs in obs.arrivals.items() if t == topic for seq in seqs
            }
            assert acked and acked <= delivered, device_id

        # the revoked TPM device: kicked with the right reason, its reconnect refused
        revoked = [d for d in obs.revoked_at if obs.hardware.get(d) == "tpm"]
        assert len(revoked) == 1 and revoked[0] in obs.kicked
        answers = {(what, answer) for who, what, answer, _ in obs.answers if who == revoked[0]}
        assert answers == {
            ("session", "DISCONNECT ADMINISTRATIVE_ACTION"),
            ("connect", "CONNACK NOT_AUTHORIZED"),
        }

        stores = summary(result)["key_stores"]
        assert {k: (s["enrolled"], s["connected"], s["lost"]) for k, s in stores.items()} == {
            "file": (FILE, FILE, 0),
            "tpm": (TPM, TPM, 0),
            "smartcard": (CARD, CARD, 0),
        }
        assert stores["tpm"]["delivered"] >= stores["tpm"]["acknowledged"] > 0
        assert "swtpm" in stores["tpm"]["hardware"]
        assert "pcscd" in stores["smartcard"]["hardware"]
        # nothing the run started outlived it (the TPMs' state sits under the data directory)
        assert processes_mentioning(str(result.data_dir)) == []
    finally:
        shutil.rmtree(result.data_dir, ignore_errors=True)
