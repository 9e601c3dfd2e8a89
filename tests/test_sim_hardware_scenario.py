"""Scenario files with tpm and smartcard groups, without hardware: what such a group may ask
for, and how the shard hears a hardware device's session end."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_sim.engine import Coordinator, Remote
from firmware_sim.hardware_fleet import session_end
from firmware_sim.scenario import (
    MAX_HARDWARE_DEVICES,
    MAX_HARDWARE_TOTAL,
    FaultKind,
    KeyStore,
    ScenarioError,
    load_scenario,
    parse_scenario,
    resized,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "hardware-line.toml"
STAGES = [{"name": "steady", "duration_s": 10}]


def scenario(*groups: dict[str, object], **extra: object) -> dict[str, object]:
    return {"groups": list(groups), "stages": STAGES, **extra}


def test_the_example_runs_small_hardware_lines_beside_a_file_key_group() -> None:
    example = load_scenario(EXAMPLE)
    kinds = {g.name: (g.key_store, g.devices) for g in example.groups}
    assert kinds == {
        "sensors": (KeyStore.FILE, 40),
        "tpm-line": (KeyStore.TPM, 3),
        "card-line": (KeyStore.SMARTCARD, 3),
    }
    assert {f.kind for f in example.faults} == {FaultKind.BROKER_RESTART, FaultKind.REVOKE}
    assert "group tpm-line's key_store tpm" in example.needs_services()
    # resizing grows the file-key fleet; the hardware lines keep their size
    bigger = resized(example, 1006)
    assert [g.devices for g in bigger.groups] == [1000, 3, 3]


def test_a_hardware_group_is_accepted_up_to_its_limit() -> None:
    parsed = parse_scenario(
        scenario(
            {"name": "tpm", "devices": MAX_HARDWARE_DEVICES, "key_store": "tpm", "qos": 0},
            {"name": "card", "devices": MAX_HARDWARE_DEVICES, "key_store": "smartcard"},
        )
    )
    assert parsed.devices == MAX_HARDWARE_TOTAL


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            scenario({"name": "t", "devices": MAX_HARDWARE_DEVICES + 1, "key_store": "tpm"}),
            f"group 't': a tpm line has at most {MAX_HARDWARE_DEVICES} devices",
        ),
        (
            scenario({"name": "c", "devices": 2, "key_store": "smartcard", "qos": 2}),
            "group 'c': qos 0 or 1 with key_store smartcard",
        ),
        (
            scenario(
                {"name": "a", "devices": 20, "key_store": "tpm"},
                {"name": "b", "devices": 20, "key_store": "smartcard"},
                {"name": "c", "devices": 1, "key_store": "tpm"},
            ),
            f"41 tpm/smartcard devices: at most {MAX_HARDWARE_TOTAL} in a scenario",
        ),
        (
            scenario(
                {"name": "t", "devices": 2, "key_store": "tpm"},
                misbehaviour=[{"kind": "acl-probe", "at_s": 1}],
            ),
            '[[misbehaviour]] needs a group with key_store = "file"',
        ),
        (
            scenario(
                {"name": "s", "devices": 2},
                {"name": "t", "devices": 2, "key_store": "tpm"},
                faults=[{"kind": "renewal-wave", "group": "t", "at_s": 1, "duration_s": 6}],
            ),
            "renews software keys only (group 't' is key_store tpm)",
        ),
    ],
)
def test_a_hardware_group_beyond_what_it_can_do_is_refused(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(table)
    assert message in str(caught.value)


def test_resizing_needs_a_file_key_group_to_grow() -> None:
    only_hardware = parse_scenario(scenario({"name": "t", "devices": 3, "key_store": "tpm"}))
    with pytest.raises(ScenarioError, match="the tpm/smartcard groups keep their 3 devices"):
        resized(only_hardware, 50)


def test_a_running_deployment_cannot_take_a_hardware_group(tmp_path: Path) -> None:
    hardware = parse_scenario(scenario({"name": "t", "devices": 2, "key_store": "smartcard"}))
    remote = Remote("https://est.example", (("mqtt.example", 8883),), *[tmp_path] * 3, "sim-")
    with pytest.raises(ValueError, match="group t's key_store smartcard"):
        Coordinator(hardware, remote=remote)


@pytest.mark.parametrize(
    ("said", "heard"),
    [
        (
            "the broker ended the session: Administrative action (0x98)",
            "DISCONNECT ADMINISTRATIVE_ACTION (0x98)",
        ),
        (
            "the broker ended the session: Server shutting down (0x8b)",
            "DISCONNECT SERVER_SHUTTING_DOWN (0x8b)",
        ),
        (
            "the connection to 127.0.0.1:8883 was lost",
            "the connection to 127.0.0.1:8883 was lost",
        ),
    ],
)
def test_the_sdk_words_for_a_session_end_become_the_simulator_s(said: str, heard: str) -> None:
    assert session_end(said) == heard
