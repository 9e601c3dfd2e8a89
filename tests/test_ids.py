"""Device and station ids: only [A-Za-z0-9._-]{1,64}, nothing that could bend an MQTT topic."""

from __future__ import annotations

import string

import pytest

from fleetgate.errors import InvalidDeviceId
from fleetgate.ids import (
    DEVICE_URI_PREFIX,
    STATION_URI_PREFIX,
    device_uri,
    id_from_uri,
    station_uri,
    validate_id,
)

ALLOWED_CHARS = set(string.ascii_letters + string.digits + "._-")


@pytest.mark.parametrize(
    "value",
    ["a", "Z", "0", "sensor-17", "line_1", "fw.v2", "-", "_", "...", ".a", "a..b", "x" * 64],
)
def test_validate_id_accepts_and_returns_valid_ids(value):
    assert validate_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 65,
        ".",
        "..",
        "a+b",
        "+",
        "#",
        "a/b",
        "/",
        "$SYS",
        "a\x00b",
        "a b",
        " a",
        "a ",
        "a\tb",
        "a\nb",
        "a\n",
        "caf\u00e9",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit, not to the id rules
        "a\u200bb",
    ],
)
def test_validate_id_refuses_unsafe_or_malformed_ids(value):
    with pytest.raises(InvalidDeviceId):
        validate_id(value)


@pytest.mark.parametrize("value", [None, 17, b"sensor-1", ["sensor-1"]])
def test_validate_id_refuses_non_strings(value):
    with pytest.raises(InvalidDeviceId):
        validate_id(value)


def test_every_ascii_character_is_accepted_exactly_when_the_rule_allows_it():
    accepted = set()
    for code in range(128):
        char = chr(code)
        for candidate in (f"a{char}b", f"{char}x", f"x{char}"):
            if char in ALLOWED_CHARS:
                assert validate_id(candidate) == candidate
            else:
                with pytest.raises(InvalidDeviceId):
                    validate_id(candidate)
        if char != ".":  # a lone "." is path-like and refused on its own
            try:
                validate_id(char)
                accepted.add(char)
            except InvalidDeviceId:
                pass
    assert accepted == ALLOWED_CHARS - {"."}


def test_the_refusal_message_states_the_rule_and_names_the_kind():
    with pytest.raises(InvalidDeviceId) as info:
        validate_id("line/1", kind="station")
    message = info.value.message
    assert message.startswith("station id 'line/1' is invalid")
    assert "1-64 characters" in message
    assert "A-Z a-z 0-9 . _ -" in message
    assert info.value.code == "invalid_device_id"
    assert info.value.http_status == 400


def test_uris_embed_validated_ids_and_round_trip():
    assert device_uri("sensor-1") == "urn:fleetgate:device:sensor-1"
    assert station_uri("line-1") == "urn:fleetgate:station:line-1"
    assert id_from_uri(device_uri("sensor-1"), DEVICE_URI_PREFIX) == "sensor-1"
    assert id_from_uri(device_uri("sensor-1"), STATION_URI_PREFIX) is None
    with pytest.raises(InvalidDeviceId):
        device_uri("sensor/#")
    with pytest.raises(InvalidDeviceId, match="station id"):
        id_from_uri(STATION_URI_PREFIX + "line+1", STATION_URI_PREFIX)
