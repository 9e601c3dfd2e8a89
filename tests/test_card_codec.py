"""The host's PIV wire format, on bytes alone (no card): TLV, chaining, status words, objects."""

from __future__ import annotations

import pytest
from card_helpers import software_card
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.piv import (
    CardRefused,
    PinBlocked,
    PivError,
    WrongPin,
    certificate_container,
    check_status,
    command_apdus,
    iter_tlv,
    object_command,
    parse_certificate_object,
    parse_generated,
    parse_signature,
    pin_block,
    sign_command,
    tlv,
    tlv_value,
)


@pytest.mark.parametrize(
    ("size", "header"),
    [(0, "0100"), (0x7F, "017f"), (0x80, "018180"), (0xFF, "0181ff"), (0x100, "01820100")],
)
def test_tlv_uses_the_shortest_definite_length(size: int, header: str) -> None:
    encoded = tlv(b"\x01", bytes(size))
    assert encoded.hex().startswith(header)
    assert list(iter_tlv(encoded)) == [(b"\x01", bytes(size))]


def test_iter_tlv_reads_multi_byte_tags_in_order() -> None:
    data = tlv(b"\x7f\x49", tlv(b"\x86", b"\x04xy")) + tlv(b"\x5f\xc1\x05", b"cert")
    assert [t for t, _ in iter_tlv(data)] == [b"\x7f\x49", b"\x5f\xc1\x05"]
    assert tlv_value(tlv_value(data, b"\x7f\x49"), b"\x86") == b"\x04xy"


@pytest.mark.parametrize("data", ["0105aa", "01", "0183000001", "5f"])
def test_malformed_tlv_is_refused(data: str) -> None:
    with pytest.raises(PivError):
        list(iter_tlv(bytes.fromhex(data)))


def test_missing_tag_names_the_tag() -> None:
    with pytest.raises(PivError, match="7C"):
        tlv_value(tlv(b"\x53", b""), b"\x7c")


def test_long_data_is_sent_with_command_chaining() -> None:
    apdus = command_apdus(0xDB, 0x3F, 0xFF, bytes(600))
    assert [a[0] for a in apdus] == [0x10, 0x10, 0x00]  # CLA bit 0x10 on all but the last
    assert [a[4] for a in apdus] == [255, 255, 90]
    assert b"".join(a[5 : 5 + a[4]] for a in apdus) == bytes(600)
    assert apdus[-1][-1] == 0x00  # Le on the last part only


def test_command_without_data_is_case_2() -> None:
    assert command_apdus(0xF9, 0x9A, 0x00) == [bytes.fromhex("00f99a0000")]
    assert command_apdus(0x20, 0x00, 0x80, le=False) == [bytes.fromhex("00200080")]


def test_pin_block_pads_with_ff_and_checks_length() -> None:
    assert pin_block("123456") == b"123456\xff\xff"
    assert pin_block("12345678") == b"12345678"
    for bad in ("12345", "123456789", "12345é"):
        with pytest.raises(PivError, match="6 to 8"):
            pin_block(bad)


def test_status_words_become_typed_errors() -> None:
    check_status(0x9000, "x")
    with pytest.raises(WrongPin) as wrong:
        check_status(0x63C2, "verify the PIN")
    assert wrong.value.retries_left == 2
    assert "2 tries left" in wrong.value.message
    with pytest.raises(PinBlocked, match="PUK"):
        check_status(0x6983, "verify the PIN")
    with pytest.raises(PinBlocked):
        check_status(0x63C0, "verify the PIN")
    with pytest.raises(CardRefused, match="verify the PIN first") as refused:
        check_status(0x6982, "sign with slot 9A")
    assert refused.value.sw == 0x6982


def test_generate_answer_gives_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert parse_generated(tlv(b"\x7f\x49", tlv(b"\x86", point))) == key
    with pytest.raises(PivError, match="invalid P-256 point"):
        parse_generated(tlv(b"\x7f\x49", tlv(b"\x86", b"\x04" + bytes(64))))


def test_sign_request_and_answer() -> None:
    digest = bytes(range(32))
    assert sign_command(digest) == bytes.fromhex("7c2482008120") + digest
    assert parse_signature(tlv(b"\x7c", tlv(b"\x82", b"sig"))) == b"sig"
    with pytest.raises(ValueError, match="32-byte"):
        sign_command(bytes(48))


def test_certificate_object_round_trip() -> None:
    cert = software_card().f9
    put = object_command(b"\x5f\xc1\x05", certificate_container(cert))
    assert tlv_value(put, b"\x5c") == b"\x5f\xc1\x05"
    stored = tlv_value(put, b"\x53")
    assert parse_certificate_object(tlv(b"\x53", stored)) == cert
    bare = cert.public_bytes(serialization.Encoding.DER)  # some cards: 53 <DER>
    assert parse_certificate_object(tlv(b"\x53", bare)) == cert
