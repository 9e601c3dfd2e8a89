"""The sans-I/O MQTT codec: byte-exact fixtures from the spec, round trips, incremental decoding,
every validation rule, cross-checks against paho-mqtt, and a seeded fuzz.

Expected bytes are written by hand from the OASIS specifications (MQTT 3.1.1 and 5.0), not
produced by the encoder under test, and paho-mqtt serves as an independent implementation.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.mqtt import (
    MAX_PACKET_SIZE,
    NO_PROPERTIES,
    Auth,
    ConnAck,
    ConnackReturnCodeV3,
    Connect,
    Decoder,
    Disconnect,
    InvalidTopic,
    MalformedPacket,
    Packet,
    PacketTooLarge,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    ProtocolLevel,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    RetainHandling,
    SharedSubscription,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    UnsupportedProtocolVersion,
    Will,
    encode,
    encode_publish,
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)
from broker.mqtt._wire import Reader
from broker.mqtt.packets import quick_init
from broker.mqtt.properties import ALLOWED, FIELDS, WILL, decode_properties, encode_properties

V3 = 4
V5 = 5
R = ReasonCode


# --- helpers that build bytes without the code under test -------------------------------------


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def s(value: str | bytes) -> bytes:
    """A length-prefixed string or binary field."""
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def frame(first: int, body: bytes) -> bytes:
    """Fixed header (remaining length below 16384) and body."""
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([n % 128 | 0x80, n // 128])
    return bytes([first]) + length + body


def connect_frame(flags: int, payload: bytes, *, level: int = V3, name: bytes = b"MQTT") -> bytes:
    props = b"\x00" if level == V5 else b""
    return frame(0x10, s(name) + bytes([level, flags]) + b"\x00\x3c" + props + payload)


def decode_all(data: bytes, level: int | None = None, **options: Any) -> list[Packet]:
    decoder = Decoder(level, **options)
    decoder.feed(data)
    packets = []
    while (packet := decoder.next_packet()) is not None:
        packets.append(packet)
    return packets


def decode_one(data: bytes, level: int | None = None) -> Packet:
    packets = decode_all(data, level)
    assert len(packets) == 1, packets
    return packets[0]


def decode_error(data: bytes, level: int | None = None, **options: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_all(data, level, **options)
    return caught.value


def level_of(packet: Packet, level: int) -> int | None:
    """Server-side decoders learn the level from CONNECT; everything else needs to be told."""
    return None if isinstance(packet, Connect) else level


# --- byte-exact fixtures -----------------------------------------------------------------------

FIXTURES: list[tuple[str, int, Packet, str]] = [
    # MQTT 3.1.1
    ("connect-minimal", V3, Connect(), "10 0c 00 04 4d 51 54 54 04 02 00 3c 00 00"),
    (
        "connect-will-credentials",
        V3,
        Connect(
            client_id="dev1",
            clean_start=False,
            keep_alive=30,
            will=Will(topic="w", payload=b"bye", qos=QoS.AT_LEAST_ONCE, retain=True),
            username="u",
            password=b"p",
        ),
        "10 1e 00 04 4d 51 54 54 04 ec 00 1e 00 04 64 65 76 31 00 01 77 00 03 62 79 65"
        " 00 01 75 00 01 70",
    ),
    ("connack-accepted", V3, ConnAck(), "20 02 00 00"),
    ("connack-session-present", V3, ConnAck(session_present=True), "20 02 01 00"),
    (
        "connack-not-authorized",
        V3,
        ConnAck(reason_code=ConnackReturnCodeV3.NOT_AUTHORIZED),
        "20 02 00 05",
    ),
    ("publish-qos0", V3, Publish(topic="a/b", payload=b"hi"), "30 07 00 03 61 2f 62 68 69"),
    (
        "publish-qos1-dup-retain",
        V3,
        Publish(
            topic="a/b", payload=b"hi", qos=QoS.AT_LEAST_ONCE, dup=True, retain=True, packet_id=10
        ),
        "3b 09 00 03 61 2f 62 00 0a 68 69",
    ),
    (
        "publish-qos2-empty-payload",
        V3,
        Publish(topic="t", qos=QoS.EXACTLY_ONCE, packet_id=0xFFFF),
        "34 05 00 01 74 ff ff",
    ),
    ("puback", V3, PubAck(packet_id=10), "40 02 00 0a"),
    ("pubrec", V3, PubRec(packet_id=10), "50 02 00 0a"),
    ("pubrel", V3, PubRel(packet_id=10), "62 02 00 0a"),
    ("pubcomp", V3, PubComp(packet_id=10), "70 02 00 0a"),
    (
        "subscribe",
        V3,
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(topic_filter="a/+", qos=QoS.AT_LEAST_ONCE),
                Subscription(topic_filter="#"),
            ),
        ),
        "82 0c 00 01 00 03 61 2f 2b 01 00 01 23 00",
    ),
    (
        "suback",
        V3,
        SubAck(packet_id=1, reason_codes=(R.GRANTED_QOS_1, R.UNSPECIFIED_ERROR)),
        "90 04 00 01 01 80",
    ),
    ("unsubscribe", V3, Unsubscribe(packet_id=2, topic_filters=("#",)), "a2 05 00 02 00 01 23"),
    ("unsuback", V3, UnsubAck(packet_id=2), "b0 02 00 02"),
    ("pingreq", V3, PingReq(), "c0 00"),
    ("pingresp", V3, PingResp(), "d0 00"),
    ("disconnect", V3, Disconnect(), "e0 00"),
    # MQTT 5.0
    ("v5-connect-minimal", V5, Connect(), "10 0d 00 04 4d 51 54 54 05 02 00 3c 00 00 00"),
    (
        "v5-connect-properties-will",
        V5,
        Connect(
            client_id="c",
            username="u",
            properties=Properties(
                session_expiry_interval=3600, receive_maximum=20, user_properties=(("a", "b"),)
            ),
            will=Will(
                topic="w",
                payload=b"x",
                properties=Properties(will_delay_interval=5, content_type="t"),
            ),
        ),
        "10 30 00 04 4d 51 54 54 05 86 00 3c"
        " 0f 11 00 00 0e 10 21 00 14 26 00 01 61 00 01 62"
        " 00 01 63"
        " 09 03 00 01 74 18 00 00 00 05"
        " 00 01 77 00 01 78 00 01 75",
    ),
    (
        "v5-connect-password-without-username",
        V5,
        Connect(password=b"pw"),
        "10 11 00 04 4d 51 54 54 05 42 00 3c 00 00 00 00 02 70 77",
    ),
    ("v5-connack", V5, ConnAck(), "20 03 00 00 00"),
    (
        "v5-connack-properties",
        V5,
        ConnAck(
            session_present=True,
            properties=Properties(
                assigned_client_identifier="x", topic_alias_maximum=10, maximum_qos=1
            ),
        ),
        "20 0c 01 00 09 12 00 01 78 22 00 0a 24 01",
    ),
    (
        "v5-connack-refused",
        V5,
        ConnAck(reason_code=R.NOT_AUTHORIZED, properties=Properties(reason_string="no")),
        "20 08 00 87 05 1f 00 02 6e 6f",
    ),
    (
        "v5-publish-all-message-properties",
        V5,
        Publish(
            topic="a/b",
            payload=b"hi",
            qos=QoS.AT_LEAST_ONCE,
            packet_id=10,
            properties=Properties(
                payload_format_indicator=1,
                message_expiry_interval=60,
                content_type="j",
                response_topic="r",
                correlation_data=b"\x01\x02",
                topic_alias=3,
                user_properties=(("k", "v"),),
            ),
        ),
        "32 28 00 03 61 2f 62 00 0a 1e 01 01 02 00 00 00 3c 03 00 01 6a 08 00 01 72"
        " 09 00 02 01 02 23 00 03 26 00 01 6b 00 01 76 68 69",
    ),
    (
        "v5-publish-topic-alias-only",
        V5,
        Publish(topic="", properties=Properties(topic_alias=3)),
        "30 06 00 00 03 23 00 03",
    ),
    (
        "v5-publish-subscription-identifiers",
        V5,
        Publish(topic="t", payload=b"p", properties=Properties(subscription_identifiers=(1, 300))),
        "30 0a 00 01 74 05 0b 01 0b ac 02 70",
    ),
    ("v5-puback-short", V5, PubAck(packet_id=10), "40 02 00 0a"),
    (
        "v5-puback-reason-only",
        V5,
        PubAck(packet_id=10, reason_code=R.NO_MATCHING_SUBSCRIBERS),
        "40 03 00 0a 10",
    ),
    (
        "v5-puback-reason-string",
        V5,
        PubAck(
            packet_id=10,
            reason_code=R.NO_MATCHING_SUBSCRIBERS,
            properties=Properties(reason_string="x"),
        ),
        "40 08 00 0a 10 04 1f 00 01 78",
    ),
    (
        "v5-pubrec-success-with-properties",
        V5,
        PubRec(packet_id=10, properties=Properties(user_properties=(("a", "b"),))),
        "50 0b 00 0a 00 07 26 00 01 61 00 01 62",
    ),
    (
        "v5-pubrel-not-found",
        V5,
        PubRel(packet_id=10, reason_code=R.PACKET_IDENTIFIER_NOT_FOUND),
        "62 03 00 0a 92",
    ),
    ("v5-pubcomp", V5, PubComp(packet_id=10), "70 02 00 0a"),
    (
        "v5-subscribe-options",
        V5,
        Subscribe(
            packet_id=2,
            subscriptions=(
                Subscription(
                    topic_filter="a/#",
                    qos=QoS.EXACTLY_ONCE,
                    no_local=True,
                    retain_as_published=True,
                    retain_handling=RetainHandling.DO_NOT_SEND,
                ),
                Subscription(topic_filter="$share/g/t", qos=QoS.AT_LEAST_ONCE),
            ),
            properties=Properties(subscription_identifiers=(5,)),
        ),
        "82 18 00 02 02 0b 05 00 03 61 2f 23 2e 00 0a 24 73 68 61 72 65 2f 67 2f 74 01",
    ),
    (
        "v5-suback",
        V5,
        SubAck(packet_id=2, reason_codes=(R.GRANTED_QOS_2, R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)),
        "90 05 00 02 00 02 9e",
    ),
    (
        "v5-unsubscribe",
        V5,
        Unsubscribe(packet_id=3, topic_filters=("#",)),
        "a2 06 00 03 00 00 01 23",
    ),
    (
        "v5-unsuback",
        V5,
        UnsubAck(packet_id=3, reason_codes=(R.NO_SUBSCRIPTION_EXISTED,)),
        "b0 04 00 03 00 11",
    ),
    ("v5-pingreq", V5, PingReq(), "c0 00"),
    ("v5-pingresp", V5, PingResp(), "d0 00"),
    ("v5-disconnect-normal", V5, Disconnect(), "e0 00"),
    (
        "v5-disconnect-with-will",
        V5,
        Disconnect(reason_code=R.DISCONNECT_WITH_WILL_MESSAGE),
        "e0 01 04",
    ),
    (
        "v5-disconnect-session-taken-over",
        V5,
        Disconnect(reason_code=R.SESSION_TAKEN_OVER, properties=Properties(reason_string="x")),
        "e0 06 8e 04 1f 00 01 78",
    ),
    ("v5-auth-success", V5, Auth(), "f0 00"),
    (
        "v5-auth-continue",
        V5,
        Auth(
            reason_code=R.CONTINUE_AUTHENTICATION,
            properties=Properties(authentication_method="SCRAM", authentication_data=b"\x00\x01"),
        ),
        "f0 0f 18 0d 15 00 05 53 43 52 41 4d 16 00 02 00 01",
    ),
]


@pytest.mark.parametrize(
    ("level", "packet", "wire"), [f[1:] for f in FIXTURES], ids=[f[0] for f in FIXTURES]
)
def test_fixture_encodes_to_the_exact_bytes(level: int, packet: Packet, wire: str) -> None:
    assert encode(packet, level) == h(wire)


@pytest.mark.parametrize(
    ("level", "packet", "wire"), [f[1:] for f in FIXTURES], ids=[f[0] for f in FIXTURES]
)
def test_fixture_decodes_to_the_packet(level: int, packet: Packet, wire: str) -> None:
    assert decode_one(h(wire), level_of(packet, level)) == packet


def test_v3_connack_decodes_to_the_v3_return_code_enum() -> None:
    packet = decode_one(h("20 02 00 04"), V3)
    assert isinstance(packet, ConnAck)
    assert packet.reason_code is ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD


@pytest.mark.parametrize(
    ("code", "v3", "v5"),
    [
        (R.UNSUPPORTED_PROTOCOL_VERSION, "20 02 00 01", "20 03 00 84 00"),
        (R.CLIENT_IDENTIFIER_NOT_VALID, "20 02 00 02", "20 03 00 85 00"),
        (R.SERVER_BUSY, "20 02 00 03", "20 03 00 89 00"),
        (ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD, "20 02 00 04", "20 03 00 86 00"),
        (ConnackReturnCodeV3.NOT_AUTHORIZED, "20 02 00 05", "20 03 00 87 00"),
    ],
)
def test_connack_codes_are_carried_across_versions(
    code: ReasonCode | ConnackReturnCodeV3, v3: str, v5: str
) -> None:
    """One code path in the broker answers both versions, e.g. for an unsupported level."""
    assert encode(ConnAck(reason_code=code), V3) == h(v3)
    assert encode(ConnAck(reason_code=code), V5) == h(v5)


# --- round trips -------------------------------------------------------------------------------

SAMPLE_VALUES: dict[str, Any] = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "application/json",
    "response_topic": "reply/to/me",
    "correlation_data": b"\x00\x01corr",
    "subscription_identifiers": (7, 268_435_455),
    "session_expiry_interval": 0xFFFF_FFFF,
    "assigned_client_identifier": "auto-123",
    "server_keep_alive": 120,
    "authentication_method": "SCRAM-SHA-256",
    "authentication_data": b"\xffdata",
    "request_problem_information": False,
    "will_delay_interval": 30,
    "request_response_information": True,
    "response_information": "resp/",
    "server_reference": "other.example:8883",
    "reason_string": "because ünïcode",
    "receive_maximum": 65535,
    "topic_alias_maximum": 0,
    "topic_alias": 1,
    "maximum_qos": 1,
    "retain_available": False,
    "user_properties": (("a", "1"), ("a", "2"), ("ключ", "значение")),
    "maximum_packet_size": 1024,
    "wildcard_subscription_available": True,
    "subscription_identifier_available": False,
    "shared_subscription_available": True,
}


def full_properties(context: PacketType | str) -> Properties:
    """Every property the context allows, set to a non-default value."""
    values = {FIELDS[prop][0]: SAMPLE_VALUES[FIELDS[prop][0]] for prop in ALLOWED[context]}
    if context == PacketType.SUBSCRIBE:
        values["subscription_identifiers"] = (7,)
    return Properties(**values)


def test_sample_values_cover_every_property() -> None:
    assert set(SAMPLE_VALUES) == {field.name for field in fields(Properties)}


ROUND_TRIP_V3: list[Packet] = [
    Connect(),
    Connect(
        client_id="ü-device",
        clean_start=False,
        keep_alive=0,
        username="",
        password=b"\x00\xff",
        will=Will(topic="$SYS/x", payload=b"\x00" * 300, qos=QoS.EXACTLY_ONCE),
    ),
    ConnAck(session_present=True),
    ConnAck(reason_code=ConnackReturnCodeV3.IDENTIFIER_REJECTED),
    Publish(topic="a", payload=b"x" * 20_000, qos=QoS.EXACTLY_ONCE, packet_id=1, retain=True),
    PubAck(packet_id=1),
    PubRec(packet_id=2),
    PubRel(packet_id=3),
    PubComp(packet_id=65535),
    Subscribe(
        packet_id=4,
        subscriptions=tuple(
            Subscription(topic_filter=f, qos=QoS(i % 3))
            for i, f in enumerate(["+", "#", "/", "a//b", "+/+/#", "$share/g/x"])
        ),
    ),
    SubAck(packet_id=4, reason_codes=(R.GRANTED_QOS_0, R.GRANTED_QOS_1, R.GRANTED_QOS_2)),
    Unsubscribe(packet_id=5, topic_filters=("a", "b/#")),
    UnsubAck(packet_id=5),
    PingReq(),
    PingResp(),
    Disconnect(),
]

ROUND_TRIP_V5: list[Packet] = [
    Connect(
        client_id="gw",
        keep_alive=65535,
        username="u",
        password=b"p",
        properties=full_properties(PacketType.CONNECT),
        will=Will(
            topic="w/t",
            payload=b"bye",
            qos=QoS.AT_LEAST_ONCE,
            retain=True,
            properties=full_properties(WILL),
        ),
    ),
    ConnAck(properties=full_properties(PacketType.CONNACK)),
    ConnAck(reason_code=R.BANNED),
    Publish(
        topic="a/b",
        payload=b"\x00\x01",
        qos=QoS.AT_LEAST_ONCE,
        packet_id=9,
        dup=True,
        properties=full_properties(PacketType.PUBLISH),
    ),
    *(
        cls(packet_id=7, reason_code=code, properties=full_properties(cls.packet_type))
        for cls, code in [
            (PubAck, R.QUOTA_EXCEEDED),
            (PubRec, R.PAYLOAD_FORMAT_INVALID),
            (PubRel, R.SUCCESS),
            (PubComp, R.PACKET_IDENTIFIER_NOT_FOUND),
        ]
    ),
    Subscribe(
        packet_id=8,
        subscriptions=(
            Subscription(
                topic_filter="a/#", retain_handling=RetainHandling.SEND_IF_NEW_SUBSCRIPTION
            ),
            Subscription(topic_filter="$share/grp/+/x", qos=QoS.EXACTLY_ONCE),
        ),
        properties=full_properties(PacketType.SUBSCRIBE),
    ),
    SubAck(
        packet_id=8,
        reason_codes=(R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED, R.GRANTED_QOS_2),
        properties=full_properties(PacketType.SUBACK),
    ),
    Unsubscribe(
        packet_id=9,
        topic_filters=("a", "$share/g/#"),
        properties=full_properties(PacketType.UNSUBSCRIBE),
    ),
    UnsubAck(
        packet_id=9,
        reason_codes=(R.SUCCESS, R.NOT_AUTHORIZED),
        properties=full_properties(PacketType.UNSUBACK),
    ),
    PingReq(),
    PingResp(),
    Disconnect(
        reason_code=R.ADMINISTRATIVE_ACTION, properties=full_properties(PacketType.DISCONNECT)
    ),
    Disconnect(reason_code=R.PACKET_TOO_LARGE),
    Auth(reason_code=R.RE_AUTHENTICATE, properties=full_properties(PacketType.AUTH)),
]


def test_round_trips_cover_every_packet_type_at_both_levels() -> None:
    assert {p.packet_type for p in ROUND_TRIP_V3} == set(PacketType) - {PacketType.AUTH}
    assert {p.packet_type for p in ROUND_TRIP_V5} == set(PacketType)


@pytest.mark.parametrize(
    ("level", "packet"),
    [(V3, p) for p in ROUND_TRIP_V3] + [(V5, p) for p in ROUND_TRIP_V5],
    ids=[f"v3-{type(p).__name__}" for p in ROUND_TRIP_V3]
    + [f"v5-{type(p).__name__}" for p in ROUND_TRIP_V5],
)
def test_round_trip(level: int, packet: Packet) -> None:
    assert decode_one(encode(packet, level), level_of(packet, level)) == packet


def test_server_decoder_learns_the_level_from_connect() -> None:
    for level in (V3, V5):
        decoder = Decoder()
        assert decoder.protocol_level is None
        decoder.feed(encode(Connect(), level) + encode(PubAck(packet_id=1), level))
        assert decoder.next_packet() == Connect()
        assert decoder.protocol_level == level
        assert isinstance(decoder.protocol_level, ProtocolLevel)
        assert decoder.next_packet() == PubAck(packet_id=1)


# --- incremental decoding ----------------------------------------------------------------------


def conversation(level: int) -> tuple[bytes, list[Packet]]:
    """One CONNECT, then every other round-trip packet, as a server would receive them."""
    samples = ROUND_TRIP_V3 if level == V3 else ROUND_TRIP_V5
    packets = [samples[0], *(p for p in samples if not isinstance(p, Connect))]
    return b"".join(encode(p, level) for p in packets), packets


@pytest.mark.parametrize("level", [V3, V5])
def test_decoding_one_byte_at_a_time(level: int) -> None:
    wire, expected = conversation(level)
    decoder = Decoder()
    decoded = []
    for index in range(len(wire)):
        decoder.feed(wire[index : index + 1])
        while (packet := decoder.next_packet()) is not None:
            decoded.append(packet)
    assert decoded == expected


@pytest.mark.parametrize("level", [V3, V5])
def test_many_packets_in_one_chunk_and_random_chunks(level: int) -> None:
    wire, expected = conversation(level)
    assert decode_all(wire) == expected
    rng = random.Random(level)
    decoder = Decoder()
    decoded = []
    position = 0
    while position < len(wire):
        step = rng.randint(1, 700)
        decoder.feed(wire[position : position + step])
        position += step
        while (packet := decoder.next_packet()) is not None:
            decoded.append(packet)
    assert decoded == expected


def test_no_packet_until_complete() -> None:
    decoder = Decoder(V3)
    assert decoder.next_packet() is None
    decoder.feed(h("30 07 00 03 61 2f"))
    assert decoder.next_packet() is None
    decoder.feed(h("62 68 69 c0"))
    assert decoder.next_packet() == Publish(topic="a/b", payload=b"hi")
    assert decoder.next_packet() is None
    decoder.feed(h("00"))
    assert decoder.next_packet() == PingReq()


# --- validation: the decoder refuses what the spec forbids --------------------------------------

SUB = 0x82
UNSUB = 0xA2


def subscribe_frame(topic_filter: str, options: int = 0, level: int = V3) -> bytes:
    props = b"\x00" if level == V5 else b""
    return frame(SUB, b"\x00\x01" + props + s(topic_filter) + bytes([options]))


# (id, decoder level, bytes, error class, reason code)
ERRORS: list[tuple[str, int | None, bytes, type[ProtocolError], ReasonCode]] = [
    # fixed header
    ("varint-5-bytes", V3, h("30 ff ff ff ff 01"), MalformedPacket, R.MALFORMED_PACKET),
    ("varint-not-minimal", V5, h("c0 80 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("type-0-v3", V3, h("00 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("type-0-v5", V5, h("00 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("type-15-v3", V3, h("f0 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("subscribe-flags-0", V3, h("80 06 00 01 00 01 61 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("unsubscribe-flags-0", V3, h("a0 05 00 01 00 01 61"), MalformedPacket, R.MALFORMED_PACKET),
    ("pubrel-flags-0", V3, h("60 02 00 01"), MalformedPacket, R.MALFORMED_PACKET),
    ("puback-flags-1", V5, h("41 02 00 01"), MalformedPacket, R.MALFORMED_PACKET),
    ("pingreq-flags", V3, h("c1 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("disconnect-flags", V5, h("e2 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("publish-qos-3", V3, h("36 05 00 01 61 00 01"), MalformedPacket, R.MALFORMED_PACKET),
    ("trailing-bytes-pingreq", V3, h("c0 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("trailing-bytes-v3-puback", V3, h("40 03 00 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("trailing-bytes-v3-disconnect", V3, h("e0 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("trailing-bytes-v3-unsuback", V3, h("b0 03 00 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("truncated-connack", V3, h("20 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("string-past-end", V3, h("30 03 00 05 61"), MalformedPacket, R.MALFORMED_PACKET),
    # PUBLISH
    ("dup-on-qos-0", V3, h("38 03 00 01 61"), ProtocolError, R.PROTOCOL_ERROR),
    ("topic-hash", V3, h("30 05 00 03 61 2f 23"), MalformedPacket, R.TOPIC_NAME_INVALID),
    ("topic-plus", V5, h("30 04 00 01 2b 00"), MalformedPacket, R.TOPIC_NAME_INVALID),
    ("empty-topic-v3", V3, h("30 02 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("empty-topic-no-alias-v5", V5, h("30 03 00 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("utf8-invalid-byte", V3, h("30 03 00 01 ff"), MalformedPacket, R.MALFORMED_PACKET),
    ("utf8-overlong", V3, h("30 04 00 02 c0 af"), MalformedPacket, R.MALFORMED_PACKET),
    ("utf8-surrogate", V3, h("30 05 00 03 ed a0 80"), MalformedPacket, R.MALFORMED_PACKET),
    ("utf8-nul", V3, h("30 03 00 01 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("utf8-truncated-sequence", V3, h("30 04 00 02 e2 82"), MalformedPacket, R.MALFORMED_PACKET),
    # packet identifiers
    ("publish-id-0", V3, h("32 05 00 01 61 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("puback-id-0", V3, h("40 02 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("pubrel-id-0", V5, h("62 02 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("subscribe-id-0", V3, h("82 06 00 00 00 01 61 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("unsubscribe-id-0", V3, h("a2 05 00 00 00 01 61"), ProtocolError, R.PROTOCOL_ERROR),
    ("suback-id-0", V3, h("90 03 00 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    # SUBSCRIBE / UNSUBSCRIBE
    ("subscribe-empty-v3", V3, h("82 02 00 01"), ProtocolError, R.PROTOCOL_ERROR),
    ("subscribe-empty-v5", V5, h("82 03 00 01 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("unsubscribe-empty", V3, h("a2 02 00 01"), ProtocolError, R.PROTOCOL_ERROR),
    *(
        (f"filter-{name}", V3, subscribe_frame(bad), MalformedPacket, R.TOPIC_FILTER_INVALID)
        for name, bad in [
            ("hash-not-last", "a/#/b"),
            ("hash-in-level", "a#"),
            ("hash-prefix", "a/b#"),
            ("plus-in-level", "sport+"),
            ("plus-prefix", "+a/b"),
            ("empty", ""),
            ("share-without-filter", "$share/g"),
            ("share-empty-filter", "$share/g/"),
            ("share-empty-name", "$share//a"),
            ("share-wildcard-name", "$share/+/a"),
        ]
    ),
    (
        "unsubscribe-bad-filter",
        V5,
        frame(UNSUB, b"\x00\x01\x00" + s("a/#/b")),
        MalformedPacket,
        R.TOPIC_FILTER_INVALID,
    ),
    ("options-reserved-v3", V3, subscribe_frame("a", 0x04), MalformedPacket, R.MALFORMED_PACKET),
    (
        "options-reserved-v5",
        V5,
        subscribe_frame("a", 0x40, V5),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    ("options-qos-3", V5, subscribe_frame("a", 0x03, V5), MalformedPacket, R.MALFORMED_PACKET),
    ("retain-handling-3", V5, subscribe_frame("a", 0x30, V5), ProtocolError, R.PROTOCOL_ERROR),
    (
        "no-local-on-shared",
        V5,
        subscribe_frame("$share/g/a", 0x04, V5),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    # CONNACK
    ("connack-reserved-flags", V3, h("20 02 02 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("connack-unknown-v3-code", V3, h("20 02 00 06"), MalformedPacket, R.MALFORMED_PACKET),
    ("connack-session-on-refusal", V3, h("20 02 01 05"), ProtocolError, R.PROTOCOL_ERROR),
    ("connack-v5-no-properties", V5, h("20 02 00 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("connack-v5-puback-reason", V5, h("20 03 00 10 00"), MalformedPacket, R.MALFORMED_PACKET),
    # reason codes
    ("reason-unknown", V5, h("40 03 00 01 05"), MalformedPacket, R.MALFORMED_PACKET),
    ("puback-pubrel-reason", V5, h("40 03 00 01 92"), MalformedPacket, R.MALFORMED_PACKET),
    ("pubrel-puback-reason", V5, h("62 03 00 01 10"), MalformedPacket, R.MALFORMED_PACKET),
    ("suback-v3-v5-reason", V3, h("90 03 00 01 87"), MalformedPacket, R.MALFORMED_PACKET),
    ("suback-empty", V3, h("90 02 00 01"), ProtocolError, R.PROTOCOL_ERROR),
    ("unsuback-v5-empty", V5, h("b0 03 00 01 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("disconnect-connack-reason", V5, h("e0 01 84"), MalformedPacket, R.MALFORMED_PACKET),
    ("auth-bad-reason", V5, h("f0 02 04 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("auth-no-property-length", V5, h("f0 01 18"), MalformedPacket, R.MALFORMED_PACKET),
    # MQTT 5 properties
    (
        "property-duplicate",
        V5,
        h("30 0a 00 01 61 06 23 00 01 23 00 02"),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    (
        "property-not-allowed",
        V5,
        h("30 09 00 01 61 05 11 00 00 00 01"),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    ("property-unknown", V5, h("30 06 00 01 61 02 7f 00"), MalformedPacket, R.MALFORMED_PACKET),
    ("topic-alias-0", V5, h("30 07 00 01 61 03 23 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    (
        "subscription-id-0",
        V5,
        h("82 09 00 01 02 0b 00 00 01 61 00"),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    (
        "two-subscription-ids-in-subscribe",
        V5,
        h("82 0b 00 01 04 0b 01 0b 02 00 01 61 00"),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    (
        "subscription-id-not-minimal",
        V5,
        h("30 07 00 01 61 03 0b 80 00"),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "auth-data-without-method",
        V5,
        h("f0 07 18 05 16 00 02 01 02"),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    ("byte-property-2", V5, h("30 06 00 01 61 02 01 02"), ProtocolError, R.PROTOCOL_ERROR),
    ("maximum-qos-2", V5, h("20 05 00 00 02 24 02"), ProtocolError, R.PROTOCOL_ERROR),
    ("receive-maximum-0", V5, h("20 06 00 00 03 21 00 00"), ProtocolError, R.PROTOCOL_ERROR),
    (
        "property-length-past-end",
        V5,
        h("30 05 00 01 61 09 01"),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "response-topic-wildcard",
        V5,
        h("30 09 00 01 61 05 08 00 02 61 23"),
        MalformedPacket,
        R.TOPIC_NAME_INVALID,
    ),
    # CONNECT (server side: the decoder learns the level from it)
    ("first-packet-not-connect", None, h("c0 00"), ProtocolError, R.PROTOCOL_ERROR),
    ("connect-to-client-decoder", V3, encode(Connect(), V3), ProtocolError, R.PROTOCOL_ERROR),
    (
        "second-connect",
        None,
        encode(Connect(), V5) + encode(Connect(), V5),
        ProtocolError,
        R.PROTOCOL_ERROR,
    ),
    (
        "connect-reserved-flag",
        None,
        connect_frame(0x03, s("c")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "will-qos-without-will-flag",
        None,
        connect_frame(0x0A, s("c")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "will-retain-without-will-flag",
        None,
        connect_frame(0x22, s("c")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "will-qos-3",
        None,
        connect_frame(0x1E, s("c") + s("w") + s(b"x")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "will-topic-wildcard",
        None,
        connect_frame(0x06, s("c") + s("a/#") + s(b"x")),
        MalformedPacket,
        R.TOPIC_NAME_INVALID,
    ),
    (
        "password-without-username-v3",
        None,
        connect_frame(0x42, s("c") + s(b"pw")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "connect-client-id-utf8",
        None,
        connect_frame(0x02, h("00 01 ff")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "connect-trailing-bytes",
        None,
        connect_frame(0x02, s("c") + b"\x00"),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "connect-v5-publish-property",
        None,
        frame(0x10, s("MQTT") + h("05 02 00 3c 03 23 00 01") + s("c")),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
    (
        "will-v5-session-expiry",
        None,
        frame(
            0x10,
            s("MQTT") + h("05 06 00 3c 00") + s("c") + h("05 11 00 00 00 01") + s("w") + s(b""),
        ),
        MalformedPacket,
        R.MALFORMED_PACKET,
    ),
]


@pytest.mark.parametrize(
    ("level", "wire", "error", "reason"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_decoder_refuses(
    level: int | None, wire: bytes, error: type[ProtocolError], reason: ReasonCode
) -> None:
    raised = decode_error(wire, level)
    assert type(raised) is error
    assert raised.reason_code == reason
    assert raised.message


@pytest.mark.parametrize(
    ("name", "level", "expected_level"),
    [("MQTT", 6, 6), ("MQTT", 3, 3), ("MQIsdp", 3, 3), ("MQTX", 4, 4), ("mqtt", 5, 5)],
)
def test_unsupported_protocol_carries_the_level(name: str, level: int, expected_level: int) -> None:
    raised = decode_error(connect_frame(0x02, s("c"), level=level, name=name.encode()))
    assert isinstance(raised, UnsupportedProtocolVersion)
    assert raised.reason_code == R.UNSUPPORTED_PROTOCOL_VERSION
    assert raised.level == expected_level
    assert raised.protocol_name == name


def test_level_is_known_after_a_connect_that_fails_later() -> None:
    """So that the server can still answer a broken MQTT 5 CONNECT with a CONNACK."""
    decoder = Decoder()
    decoder.feed(connect_frame(0x03, s("c"), level=V5))
    with pytest.raises(MalformedPacket):
        decoder.next_packet()
    assert decoder.protocol_level == ProtocolLevel.MQTT_5


def test_password_without_username_is_fine_in_v5() -> None:
    packet = decode_one(connect_frame(0x42, s("c") + s(b"pw"), level=V5))
    assert packet == Connect(client_id="c", password=b"pw")


def test_packet_too_large_is_raised_from_the_header_alone() -> None:
    decoder = Decoder(V3, max_packet_size=100)
    decoder.feed(h("30 ff 7f"))  # announces 16383 bytes; none of them sent yet
    with pytest.raises(PacketTooLarge) as caught:
        decoder.next_packet()
    assert caught.value.reason_code == R.PACKET_TOO_LARGE
    assert (caught.value.size, caught.value.limit) == (3 + 16383, 100)


def test_max_packet_size_counts_the_whole_packet() -> None:
    exactly = frame(0x30, s("t") + b"x" * 95)
    assert len(exactly) == 100
    assert decode_all(exactly, V3, max_packet_size=100) == [Publish(topic="t", payload=b"x" * 95)]
    assert isinstance(decode_error(exactly, V3, max_packet_size=99), PacketTooLarge)
    assert MAX_PACKET_SIZE == 268_435_460


# --- validation: the encoder refuses what the spec or the level forbids ------------------------

ENCODE_ERRORS: list[tuple[str, int, Packet]] = [
    ("wildcard-topic", V3, Publish(topic="a/#")),
    ("nul-in-topic", V5, Publish(topic="a\x00")),
    ("qos1-without-id", V3, Publish(topic="a", qos=QoS.AT_LEAST_ONCE)),
    ("qos0-with-id", V3, Publish(topic="a", packet_id=1)),
    ("dup-qos0", V5, Publish(topic="a", dup=True)),
    ("alias-in-v3", V3, Publish(topic="", properties=Properties(topic_alias=1))),
    ("reason-in-v3", V3, PubAck(packet_id=1, reason_code=R.NO_MATCHING_SUBSCRIBERS)),
    ("properties-in-v3", V3, Disconnect(properties=Properties(reason_string="x"))),
    ("auth-in-v3", V3, Auth()),
    ("password-without-user-v3", V3, Connect(password=b"x")),
    (
        "v5-option-in-v3",
        V3,
        Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="a", no_local=True),)),
    ),
    ("no-subscriptions", V5, Subscribe(packet_id=1, subscriptions=())),
    ("bad-filter", V5, Unsubscribe(packet_id=1, topic_filters=("a/#/b",))),
    ("connack-without-v3-code", V3, ConnAck(reason_code=R.MALFORMED_PACKET)),
    ("connack-puback-reason", V5, ConnAck(reason_code=R.NO_MATCHING_SUBSCRIBERS)),
    ("connack-session-on-refusal", V5, ConnAck(session_present=True, reason_code=R.BANNED)),
    (
        "property-not-allowed",
        V5,
        Publish(topic="a", properties=Properties(session_expiry_interval=1)),
    ),
    (
        "two-subscription-ids",
        V5,
        Subscribe(
            packet_id=1,
            subscriptions=(Subscription(topic_filter="a"),),
            properties=Properties(subscription_identifiers=(1, 2)),
        ),
    ),
    ("packet-id-too-big", V3, PubAck(packet_id=70_000)),
    ("packet-id-0", V5, PubRel(packet_id=0)),
    ("keep-alive-negative", V3, Connect(keep_alive=-1)),
    ("unsuback-codes-in-v3", V3, UnsubAck(packet_id=1, reason_codes=(R.SUCCESS,))),
    ("suback-v5-code-in-v3", V3, SubAck(packet_id=1, reason_codes=(R.QUOTA_EXCEEDED,))),
    ("string-too-long", V3, Connect(client_id="x" * 65536)),
    ("lone-surrogate", V5, Connect(client_id="\ud800")),
    (
        "subscription-id-too-big",
        V5,
        Publish(topic="a", properties=Properties(subscription_identifiers=(268_435_456,))),
    ),
]


@pytest.mark.parametrize(
    ("level", "packet"), [e[1:] for e in ENCODE_ERRORS], ids=[e[0] for e in ENCODE_ERRORS]
)
def test_encoder_refuses(level: int, packet: Packet) -> None:
    with pytest.raises(ValueError):
        encode(packet, level)


def test_encoder_refuses_unknown_levels() -> None:
    for level in (3, 6):
        with pytest.raises(ValueError):
            encode(PingReq(), level)
        with pytest.raises(ValueError):
            Decoder(level)


# --- topics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "/", "a/b/c", "$SYS/broker", "ü/€", " ", "a//b"])
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize("name", ["", "a/+", "#", "a/b#", "a\x00b", "x" * 65536])
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(name)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/#", "+/+", "/+", "a/+/b/#", "$share/g/#", "$share/g/a/+", "$sharex/a"],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a/#/b", "#/", "a#", "a+", "+a", "a/b+/c", "$share/g", "$share//x", "$share/#/x", "\x00"],
)
def test_invalid_topic_filters(topic_filter: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "name", "matches"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "a/b/c", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("a/b", "a/b", True),
        ("a/b", "a/B", False),
        ("a/b", "a/b/c", False),
        ("#", "$SYS/monitor/Clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("a/#", "a/$b", True),
    ],
)
def test_topic_matches(topic_filter: str, name: str, matches: bool) -> None:
    assert topic_matches(topic_filter, name) is matches


def test_shared_subscriptions() -> None:
    assert parse_shared_subscription("$share/grp/a/+/#") == SharedSubscription("grp", "a/+/#")
    assert parse_shared_subscription("$share/g//") == SharedSubscription("g", "/")
    assert parse_shared_subscription("a/b") is None
    assert parse_shared_subscription("$SYS/x") is None
    with pytest.raises(InvalidTopic):
        parse_shared_subscription("$share/g/a/#/b")


# --- properties cross-checked with paho-mqtt's implementation ----------------------------------

PAHO_CONTEXT = {
    PacketType.CONNECT: PacketTypes.CONNECT,
    WILL: PacketTypes.WILLMESSAGE,
    PacketType.CONNACK: PacketTypes.CONNACK,
    PacketType.PUBLISH: PacketTypes.PUBLISH,
    PacketType.PUBACK: PacketTypes.PUBACK,
    PacketType.PUBREC: PacketTypes.PUBREC,
    PacketType.PUBREL: PacketTypes.PUBREL,
    PacketType.PUBCOMP: PacketTypes.PUBCOMP,
    PacketType.SUBSCRIBE: PacketTypes.SUBSCRIBE,
    PacketType.SUBACK: PacketTypes.SUBACK,
    PacketType.UNSUBSCRIBE: PacketTypes.UNSUBSCRIBE,
    PacketType.UNSUBACK: PacketTypes.UNSUBACK,
    PacketType.DISCONNECT: PacketTypes.DISCONNECT,
    PacketType.AUTH: PacketTypes.AUTH,
}


# Our field name -> paho's attribute name, joined through the numeric property identifier.
PAHO_NAMES = {
    FIELDS[ident][0]: name.replace(" ", "")
    for name, ident in PahoProperties(PacketTypes.PUBLISH).names.items()
}


def paho_properties(properties: Properties, packet_type: int) -> PahoProperties:
    paho = PahoProperties(packet_type)
    for field in fields(Properties):
        value = getattr(properties, field.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, bool):
            value = int(value)
        if value is not None and value != []:
            setattr(paho, PAHO_NAMES[field.name], value)
    return paho


@pytest.mark.parametrize("context", list(PAHO_CONTEXT), ids=lambda c: getattr(c, "name", c))
def test_properties_agree_with_paho(context: PacketType | str) -> None:
    ours = full_properties(context)
    paho = paho_properties(ours, PAHO_CONTEXT[context])  # paho refuses properties not allowed here
    wire = encode_properties(ours)
    assert wire == paho.pack()
    assert decode_properties(Reader(paho.pack()), context) == ours
    unpacked, length = PahoProperties(PAHO_CONTEXT[context]).unpack(wire)
    assert length == len(wire)
    assert unpacked.json() == paho.json()


def test_every_context_allows_exactly_what_paho_allows() -> None:
    probe = PahoProperties(PacketTypes.PUBLISH)
    for context, packet_type in PAHO_CONTEXT.items():
        paho_allowed = {
            ident for ident, (_, packets) in probe.properties.items() if packet_type in packets
        }
        assert {int(p) for p in ALLOWED[context]} == paho_allowed, context


# --- live cross-checks: a real paho client against a listener driven by our codec ---------------


class PahoSession:
    """A paho client connected over loopback TCP to a socket the test plays the broker on.

    paho writes synchronously when not threaded, so bytes it sends are on the socket once its
    call returns; bytes we send are handled in ``pump``, observed through its callbacks.
    """

    def __init__(self, protocol: int, **client_options: Any) -> None:
        self.level = V5 if protocol == mqtt.MQTTv5 else V3
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol, **client_options)
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        for name in ("connect", "subscribe", "unsubscribe", "publish", "message", "disconnect"):
            setattr(self.client, f"on_{name}", self._recorder(name))
        self.decoder = Decoder()
        self.conn: socket.socket | None = None

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(client: mqtt.Client, userdata: Any, *args: Any) -> None:
            self.events.append((name, args))

        return record

    def connect(self, **options: Any) -> Connect:
        port = self.listener.getsockname()[1]
        self.client.connect("127.0.0.1", port, **options)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(5)
        packet = self.receive()
        assert isinstance(packet, Connect)
        assert self.decoder.protocol_level == self.level
        return packet

    def receive(self) -> Packet:
        assert self.conn is not None
        while (packet := self.decoder.next_packet()) is None:
            data = self.conn.recv(65536)
            assert data, "paho closed the connection"
            self.decoder.feed(data)
        return packet

    def send(self, packet: Packet) -> None:
        assert self.conn is not None
        self.conn.sendall(encode(packet, self.level))

    def pump(self, event: str) -> tuple[Any, ...]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for index, (name, args) in enumerate(self.events):
                if name == event:
                    del self.events[index]
                    return args
            self.client.loop(timeout=0.02)
        raise AssertionError(f"paho never reported {event}; saw {self.events}")

    def close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def paho_session() -> Iterator[Callable[..., PahoSession]]:
    sessions: list[PahoSession] = []

    def start(protocol: int, **options: Any) -> PahoSession:
        sessions.append(PahoSession(protocol, **options))
        return sessions[-1]

    yield start
    for session in sessions:
        session.close()


def test_paho_v311_session(paho_session: Callable[..., PahoSession]) -> None:
    peer = paho_session(mqtt.MQTTv311, client_id="sensor-7", clean_session=False)
    peer.client.will_set("fleet/sensor-7/status", b"offline", qos=1, retain=True)
    peer.client.username_pw_set("sensor-7", "secret")
    assert peer.connect(keepalive=45) == Connect(
        client_id="sensor-7",
        clean_start=False,
        keep_alive=45,
        username="sensor-7",
        password=b"secret",
        will=Will(
            topic="fleet/sensor-7/status", payload=b"offline", qos=QoS.AT_LEAST_ONCE, retain=True
        ),
    )

    peer.send(ConnAck(session_present=True))
    flags, reason, _ = peer.pump("connect")
    assert flags.session_present and reason == 0

    _, mid = peer.client.subscribe([("cmd/#", 1), ("cfg/+", 2)])
    assert peer.receive() == Subscribe(
        packet_id=mid,
        subscriptions=(
            Subscription(topic_filter="cmd/#", qos=QoS.AT_LEAST_ONCE),
            Subscription(topic_filter="cfg/+", qos=QoS.EXACTLY_ONCE),
        ),
    )
    peer.send(SubAck(packet_id=mid, reason_codes=(R.GRANTED_QOS_1, R.UNSPECIFIED_ERROR)))
    got_mid, codes, _ = peer.pump("subscribe")
    assert got_mid == mid and [c.value for c in codes] == [1, 0x80]

    info = peer.client.publish("telemetry/t", b"21.5", qos=1)
    assert peer.receive() == Publish(
        topic="telemetry/t", payload=b"21.5", qos=QoS.AT_LEAST_ONCE, packet_id=info.mid
    )
    peer.send(PubAck(packet_id=info.mid))
    assert peer.pump("publish")[0] == info.mid

    info = peer.client.publish("telemetry/t", b"", qos=2, retain=True)
    assert peer.receive() == Publish(
        topic="telemetry/t", qos=QoS.EXACTLY_ONCE, retain=True, packet_id=info.mid
    )
    peer.send(PubRec(packet_id=info.mid))
    peer.client.loop(timeout=0.05)
    assert peer.receive() == PubRel(packet_id=info.mid)
    peer.send(PubComp(packet_id=info.mid))
    assert peer.pump("publish")[0] == info.mid

    peer.send(Publish(topic="cmd/reboot", payload=b"now", qos=QoS.AT_LEAST_ONCE, packet_id=7))
    (message,) = peer.pump("message")
    assert (message.topic, message.payload, message.qos, message.mid) == (
        "cmd/reboot",
        b"now",
        1,
        7,
    )
    assert peer.receive() == PubAck(packet_id=7)

    peer.send(Publish(topic="cmd/x", payload=b"2", qos=QoS.EXACTLY_ONCE, packet_id=8, retain=True))
    peer.client.loop(timeout=0.05)
    assert peer.receive() == PubRec(packet_id=8)
    peer.send(PubRel(packet_id=8))
    (message,) = peer.pump("message")
    assert (message.topic, message.qos, message.retain) == ("cmd/x", 2, True)
    assert peer.receive() == PubComp(packet_id=8)

    _, mid = peer.client.unsubscribe("cmd/#")
    assert peer.receive() == Unsubscribe(packet_id=mid, topic_filters=("cmd/#",))
    peer.send(UnsubAck(packet_id=mid))
    assert peer.pump("unsubscribe")[0] == mid

    peer.client.disconnect()
    assert peer.receive() == Disconnect()


def test_paho_v5_session(paho_session: Callable[..., PahoSession]) -> None:
    peer = paho_session(mqtt.MQTTv5, client_id="gw-1")
    will_props = PahoProperties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 10
    will_props.MessageExpiryInterval = 3600
    will_props.ContentType = "text/plain"
    will_props.PayloadFormatIndicator = 1
    will_props.ResponseTopic = "r/t"
    will_props.CorrelationData = b"\x01"
    will_props.UserProperty = ("site", "lab")
    peer.client.will_set("gw/status", b"gone", qos=2, properties=will_props)
    peer.client.username_pw_set("gw-1", b"\x00\xffbinary")
    connect_props = PahoProperties(PacketTypes.CONNECT)
    connect_props.SessionExpiryInterval = 300
    connect_props.ReceiveMaximum = 10
    connect_props.MaximumPacketSize = 65536
    connect_props.TopicAliasMaximum = 4
    connect_props.RequestResponseInformation = 1
    connect_props.RequestProblemInformation = 0
    connect_props.UserProperty = [("fw", "1.2"), ("fw", "1.3")]
    connect_props.AuthenticationMethod = "token"
    connect_props.AuthenticationData = b"\x01\x02"
    assert peer.connect(keepalive=20, clean_start=False, properties=connect_props) == Connect(
        client_id="gw-1",
        clean_start=False,
        keep_alive=20,
        username="gw-1",
        password=b"\x00\xffbinary",
        will=Will(
            topic="gw/status",
            payload=b"gone",
            qos=QoS.EXACTLY_ONCE,
            properties=Properties(
                will_delay_interval=10,
                message_expiry_interval=3600,
                content_type="text/plain",
                payload_format_indicator=1,
                response_topic="r/t",
                correlation_data=b"\x01",
                user_properties=(("site", "lab"),),
            ),
        ),
        properties=Properties(
            session_expiry_interval=300,
            receive_maximum=10,
            maximum_packet_size=65536,
            topic_alias_maximum=4,
            request_response_information=True,
            request_problem_information=False,
            user_properties=(("fw", "1.2"), ("fw", "1.3")),
            authentication_method="token",
            authentication_data=b"\x01\x02",
        ),
    )

    peer.send(
        ConnAck(
            properties=Properties(
                assigned_client_identifier="gw-1-assigned",
                server_keep_alive=15,
                receive_maximum=5,
                maximum_qos=1,
                retain_available=False,
                topic_alias_maximum=3,
                wildcard_subscription_available=True,
                reason_string="welcome",
                user_properties=(("region", "eu"),),
            )
        )
    )
    flags, reason, props = peer.pump("connect")
    assert not flags.session_present and reason.value == 0
    assert props.AssignedClientIdentifier == "gw-1-assigned"
    assert (props.ServerKeepAlive, props.ReceiveMaximum, props.MaximumQoS) == (15, 5, 1)
    assert props.UserProperty == [("region", "eu")]

    sub_props = PahoProperties(PacketTypes.SUBSCRIBE)
    sub_props.SubscriptionIdentifier = 42
    sub_props.UserProperty = ("k", "v")
    _, mid = peer.client.subscribe(
        [
            (
                "cmd/#",
                SubscribeOptions(
                    qos=2,
                    noLocal=True,
                    retainAsPublished=True,
                    retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
                ),
            ),
            ("$share/grp/jobs/+", SubscribeOptions(qos=1)),
        ],
        properties=sub_props,
    )
    assert peer.receive() == Subscribe(
        packet_id=mid,
        subscriptions=(
            Subscription(
                topic_filter="cmd/#",
                qos=QoS.EXACTLY_ONCE,
                no_local=True,
                retain_as_published=True,
                retain_handling=RetainHandling.SEND_IF_NEW_SUBSCRIPTION,
            ),
            Subscription(topic_filter="$share/grp/jobs/+", qos=QoS.AT_LEAST_ONCE),
        ),
        properties=Properties(subscription_identifiers=(42,), user_properties=(("k", "v"),)),
    )
    peer.send(
        SubAck(
            packet_id=mid,
            reason_codes=(R.GRANTED_QOS_1, R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED),
            properties=Properties(reason_string="no sharing"),
        )
    )
    got_mid, codes, props = peer.pump("subscribe")
    assert got_mid == mid and [c.value for c in codes] == [1, 0x9E]
    assert props.ReasonString == "no sharing"

    pub_props = PahoProperties(PacketTypes.PUBLISH)
    pub_props.PayloadFormatIndicator = 1
    pub_props.MessageExpiryInterval = 60
    pub_props.ContentType = "application/json"
    pub_props.ResponseTopic = "gw/replies"
    pub_props.CorrelationData = b"req-1"
    pub_props.UserProperty = [("a", "1"), ("a", "2")]
    pub_props.TopicAlias = 2
    info = peer.client.publish("gw/data", b'{"t": 1}', qos=1, properties=pub_props)
    assert peer.receive() == Publish(
        topic="gw/data",
        payload=b'{"t": 1}',
        qos=QoS.AT_LEAST_ONCE,
        packet_id=info.mid,
        properties=Properties(
            payload_format_indicator=1,
            message_expiry_interval=60,
            content_type="application/json",
            response_topic="gw/replies",
            correlation_data=b"req-1",
            user_properties=(("a", "1"), ("a", "2")),
            topic_alias=2,
        ),
    )
    peer.send(
        PubAck(
            packet_id=info.mid,
            reason_code=R.NO_MATCHING_SUBSCRIBERS,
            properties=Properties(reason_string="nobody listens"),
        )
    )
    got_mid, reason, props = peer.pump("publish")
    assert got_mid == info.mid and reason.value == 0x10

    info = peer.client.publish("gw/data", b"x", qos=2)
    assert peer.receive() == Publish(
        topic="gw/data", payload=b"x", qos=QoS.EXACTLY_ONCE, packet_id=info.mid
    )
    peer.send(PubRec(packet_id=info.mid))
    peer.client.loop(timeout=0.05)
    assert peer.receive() == PubRel(packet_id=info.mid)
    peer.send(PubComp(packet_id=info.mid))
    assert peer.pump("publish")[0] == info.mid

    peer.send(
        Publish(
            topic="cmd/update",
            payload=b"v2",
            qos=QoS.AT_LEAST_ONCE,
            packet_id=300,
            properties=Properties(
                subscription_identifiers=(42, 7),
                content_type="text/plain",
                user_properties=(("origin", "ops"),),
                message_expiry_interval=30,
            ),
        )
    )
    (message,) = peer.pump("message")
    assert (message.topic, message.payload, message.mid) == ("cmd/update", b"v2", 300)
    assert message.properties.SubscriptionIdentifier == [42, 7]
    assert message.properties.UserProperty == [("origin", "ops")]
    assert message.properties.ContentType == "text/plain"
    assert peer.receive() == PubAck(packet_id=300)

    _, mid = peer.client.unsubscribe(["cmd/#", "gone/#"])
    assert peer.receive() == Unsubscribe(packet_id=mid, topic_filters=("cmd/#", "gone/#"))
    peer.send(UnsubAck(packet_id=mid, reason_codes=(R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED)))
    got_mid, codes, _ = peer.pump("unsubscribe")
    assert got_mid == mid and [c.value for c in codes] == [0, 0x11]

    disconnect_props = PahoProperties(PacketTypes.DISCONNECT)
    disconnect_props.SessionExpiryInterval = 0
    peer.client.disconnect(
        reasoncode=PahoReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"),
        properties=disconnect_props,
    )
    assert peer.receive() == Disconnect(
        reason_code=R.DISCONNECT_WITH_WILL_MESSAGE,
        properties=Properties(session_expiry_interval=0),
    )


def test_paho_accepts_a_server_disconnect(paho_session: Callable[..., PahoSession]) -> None:
    peer = paho_session(mqtt.MQTTv5, client_id="d")
    assert peer.connect() == Connect(client_id="d", properties=NO_PROPERTIES)
    peer.send(ConnAck())
    peer.pump("connect")
    peer.send(
        Disconnect(reason_code=R.SESSION_TAKEN_OVER, properties=Properties(reason_string="dup"))
    )
    _, reason, _ = peer.pump("disconnect")
    assert reason.value == 0x8E


@pytest.mark.parametrize(
    ("protocol", "code", "paho_value"),
    [
        (mqtt.MQTTv311, R.BAD_USER_NAME_OR_PASSWORD, 0x86),
        (mqtt.MQTTv5, R.BAD_USER_NAME_OR_PASSWORD, 0x86),
        (mqtt.MQTTv311, ConnackReturnCodeV3.IDENTIFIER_REJECTED, 0x85),
        (mqtt.MQTTv5, ConnackReturnCodeV3.SERVER_UNAVAILABLE, 0x88),
    ],
)
def test_paho_sees_a_refused_connection(
    paho_session: Callable[..., PahoSession],
    protocol: int,
    code: ReasonCode | ConnackReturnCodeV3,
    paho_value: int,
) -> None:
    """paho reports 3.1.1 return codes as the equivalent MQTT 5 reason codes."""
    peer = paho_session(protocol, client_id="r")
    peer.connect()
    peer.send(ConnAck(reason_code=code))
    _, reason, _ = peer.pump("connect")
    assert reason.value == paho_value


def test_paho_downgrades_to_mqtt_3_1_after_unsupported_version(
    paho_session: Callable[..., PahoSession],
) -> None:
    """The broker's answer to an unsupported level, seen from both ends: paho takes CONNACK 1 as
    "try MQTT 3.1", and the decoder refuses that CONNECT carrying the level to answer."""
    peer = paho_session(mqtt.MQTTv311, client_id="old")
    peer.connect()
    peer.send(ConnAck(reason_code=R.UNSUPPORTED_PROTOCOL_VERSION))
    deadline = time.monotonic() + 5
    while not select.select([peer.listener], [], [], 0)[0]:
        assert time.monotonic() < deadline, "paho did not reconnect"
        peer.client.loop(timeout=0.02)
    second, _ = peer.listener.accept()
    with second:
        second.settimeout(5)
        decoder = Decoder()
        with pytest.raises(UnsupportedProtocolVersion) as caught:
            while decoder.next_packet() is None:
                decoder.feed(second.recv(65536))
    assert (caught.value.level, caught.value.protocol_name) == (3, "MQIsdp")
    assert decoder.protocol_level is None


# --- fuzz --------------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice < 0.6 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif choice < 0.75:
            out.insert(rng.randrange(len(out) + 1), rng.randrange(256))
        elif choice < 0.9 and out:
            del out[rng.randrange(len(out))]
        else:
            out = out[: rng.randrange(len(out) + 1)]
    return bytes(out)


@pytest.mark.timeout(20)
def test_fuzz_only_protocol_errors_and_accepted_packets_round_trip() -> None:
    """Random and mutated input never raises anything but ProtocolError and never hangs; what
    the decoder accepts the encoder accepts too, and it decodes back to the same packet."""
    rng = random.Random(20240611)
    streams = {level: conversation(level)[0] for level in (V3, V5)}
    boundaries = {
        level: [len(encode(p, level)) for p in conversation(level)[1]] for level in (V3, V5)
    }
    outcomes = {"error": 0, "packets": 0}
    for case in range(4000):
        level = rng.choice([V3, V5])
        server = rng.random() < 0.5
        if case % 4 == 0:
            data = rng.randbytes(rng.randint(0, 48))
        else:
            # A server stream starts with its CONNECT; a client stream at a later packet.
            sizes = boundaries[level]
            start = 0 if server else sum(sizes[: rng.randint(1, len(sizes) - 1)])
            data = mutate(rng, streams[level][start : start + rng.randint(2, 400)])
        decoder = Decoder(
            None if server else level, max_packet_size=rng.choice([MAX_PACKET_SIZE, 64])
        )
        position = 0
        try:
            while position < len(data):
                step = rng.randint(1, 64)
                decoder.feed(data[position : position + step])
                position += step
                for _ in range(len(data) + 1):
                    packet = decoder.next_packet()
                    if packet is None:
                        break
                    outcomes["packets"] += 1
                    known = decoder.protocol_level
                    assert known is not None
                    again = decode_one(
                        encode(packet, known), None if isinstance(packet, Connect) else known
                    )
                    assert again == packet
                else:
                    raise AssertionError("decoder keeps returning packets without consuming")
        except ProtocolError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1000 and outcomes["packets"] > 1000, outcomes


def test_replace_keeps_packets_immutable_values() -> None:
    """Packets are values: changing one means building a new one."""
    packet = Publish(topic="a", payload=b"1")
    with pytest.raises(AttributeError):
        packet.topic = "b"
    assert replace(packet, topic="b") == Publish(topic="b", payload=b"1")
    assert hash(packet) == hash(Publish(topic="a", payload=b"1"))


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize(
    "packet",
    [
        Publish(topic="devices/d1/telemetry", payload=b"21.5"),
        Publish(topic="a/b", payload=b"x" * 300, qos=QoS.AT_LEAST_ONCE, packet_id=7, retain=True),
        Publish(topic="ü/ñ", payload=b"", qos=QoS.EXACTLY_ONCE, packet_id=65535, dup=True),
        Publish(
            topic="devices/d1/telemetry",
            payload=b"{}",
            qos=QoS.AT_LEAST_ONCE,
            packet_id=1,
            properties=Properties(message_expiry_interval=30, subscription_identifiers=(5,)),
        ),
    ],
)
def test_the_trusted_publish_fast_path_writes_the_same_bytes(packet, level) -> None:
    if level == 4 and packet.properties != NO_PROPERTIES:
        packet = dataclasses.replace(packet, properties=NO_PROPERTIES)
    assert encode(packet, level, validate=False) == encode(packet, level)


# --- the PUBLISH/PUBACK hot paths agree with the generic decoder and encoder -------------------


def generic_decode(data: bytes, level: int) -> Packet | ProtocolError:
    """The generic path alone: the fast paths switched off for this decoder."""
    decoder = Decoder(level)
    decoder._fast_publish = lambda *args: None  # type: ignore[method-assign]
    decoder._fast_puback = lambda *args: None  # type: ignore[method-assign]
    decoder.feed(data)
    try:
        return decoder.next_packet()  # type: ignore[return-value]
    except ProtocolError as exc:
        return exc


def fast_decode(data: bytes, level: int) -> Packet | ProtocolError:
    try:
        return decode_one(data, level)
    except ProtocolError as exc:
        return exc


def item_decode(data: bytes, level: int) -> Packet | ProtocolError:
    """``next_item``, the broker's path: a plain PUBLISH comes as a tuple of its fields, here
    turned into the :class:`Publish` it stands for."""
    decoder = Decoder(level)
    decoder.feed(data)
    try:
        item = decoder.next_item()
    except ProtocolError as exc:
        return exc
    if isinstance(item, tuple):
        topic, payload, qos, retain, dup, packet_id = item
        assert type(qos) is QoS and type(retain) is bool and type(dup) is bool
        return Publish(
            topic=topic, payload=payload, qos=qos, retain=retain, dup=dup, packet_id=packet_id
        )
    assert item is not None
    return item


def publish_frame(first: int, topic: bytes, tail: bytes) -> bytes:
    return frame(first, len(topic).to_bytes(2, "big") + topic + tail)


HOT_PATH_CASES = [
    (0x30, b"a/b", b"\x00payload"),  # QoS 0, empty properties (MQTT 5)
    (0x31, b"a/b", b"\x00"),  # retained, empty payload
    (0x32, b"a/b", b"\x00\x07\x00x"),  # QoS 1
    (0x3D, b"a/b", b"\x00\x07\x00x"),  # QoS 2, DUP, retain
    (0x38, b"a/b", b"\x00x"),  # DUP on QoS 0
    (0x32, b"a/b", b"\x00\x00\x00x"),  # packet id 0
    (0x30, b"a/+", b"\x00x"),  # wildcards in a topic name
    (0x30, b"a/#", b"\x00x"),
    (0x30, b"a\x00b", b"\x00x"),  # U+0000
    (0x30, b"\xff\xfe", b"\x00x"),  # not UTF-8
    (0x30, b"", b"\x00x"),  # empty topic, no alias
    (0x30, b"", b"\x03\x23\x00\x01x"),  # empty topic with an alias (MQTT 5)
    (0x30, b"a/b", b"\x03\x23\x00\x01x"),  # properties present
    (0x30, b"a/b", b"\x05\x02\x00\x00\x00\x0ax"),  # message expiry
    (0x30, b"a/b", b"\x02\x23\x00"),  # properties cut short
    (0x32, b"a/b", b"\x00"),  # packet id cut short
    (0x32, b"a/b", b"\x00\x07\x00" + b"x" * 300),  # a two-byte remaining length
    (0x33, b"d/" + b"t" * 200, b"\x00\x07\x00" + b"x" * 20_000),  # three bytes, retained
]


@pytest.mark.parametrize("level", [V3, V5])
@pytest.mark.parametrize(("first", "topic", "tail"), HOT_PATH_CASES)
def test_publish_hot_path_decodes_and_refuses_as_the_generic_path(level, first, topic, tail):
    data = publish_frame(first, topic, tail)
    generic = generic_decode(data, level)
    for fast in (fast_decode(data, level), item_decode(data, level)):
        if isinstance(generic, ProtocolError):
            assert isinstance(fast, type(generic))
            assert (fast.reason_code, fast.message) == (generic.reason_code, generic.message)
        else:
            assert fast == generic


@pytest.mark.parametrize("level", [V3, V5])
def test_next_item_gives_a_plain_publish_as_a_tuple_and_anything_else_as_a_packet(level):
    plain = Publish(topic="a/b", payload=b"x", qos=QoS.AT_LEAST_ONCE, packet_id=7, dup=True)
    other = Publish(topic="a/b", payload=b"x", properties=Properties(content_type="json"))
    decoder = Decoder(level)
    decoder.feed(encode(plain, level) + encode(PubAck(packet_id=7), level))
    if level == V5:
        decoder.feed(encode(other, level))
    assert decoder.next_item() == ("a/b", b"x", QoS.AT_LEAST_ONCE, False, True, 7)
    assert decoder.next_item() == PubAck(packet_id=7)
    if level == V5:
        assert decoder.next_item() == other
    assert decoder.next_item() is None


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_next_item_waits_for_a_whole_packet_however_the_bytes_arrive(step):
    data = encode(Publish(topic="a/b", payload=b"y" * 200, qos=QoS.AT_LEAST_ONCE, packet_id=1), V5)
    decoder, items = Decoder(V5), []
    for at in range(0, len(data), step):
        decoder.feed(data[at : at + step])
        while (item := decoder.next_item()) is not None:
            items.append(item)
    assert items == [("a/b", b"y" * 200, QoS.AT_LEAST_ONCE, False, False, 1)]


# --- quick_init: the frozen values built per message ------------------------------------------


def twin_classes() -> tuple[type, type]:
    """The same frozen dataclass twice: with the generated ``__init__`` and with quick_init."""

    def make() -> type:
        @dataclasses.dataclass(frozen=True, slots=True)
        class Value:
            a: int
            b: str = "b"
            c: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)

        return Value

    return make(), quick_init(make())


def test_quick_init_builds_what_the_dataclass_init_builds():
    plain, quick = twin_classes()
    for args, kwargs in (((1,), {}), ((1, "x"), {"c": (2,)}), ((), {"a": 3, "b": "y"})):
        made, reference = quick(*args, **kwargs), plain(*args, **kwargs)
        assert dataclasses.astuple(made) == dataclasses.astuple(reference)
        assert made == quick(*args, **kwargs) and hash(made) == hash(quick(*args, **kwargs))
    assert inspect.signature(quick.__init__) == inspect.signature(plain.__init__)
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick(1).a = 2  # type: ignore[misc]
    assert dataclasses.replace(quick(1), b="z") == quick(1, "z")
    for bad_args, bad_kwargs in (((), {}), ((1, "x", ()), {}), ((1,), {"d": 1})):
        with pytest.raises(TypeError):
            quick(*bad_args, **bad_kwargs)


def test_quick_init_refuses_what_it_cannot_build():
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithPostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class WithoutSlots:
        a: int = 1

    for cls in (WithFactory, WithPostInit, WithoutSlots):
        with pytest.raises(TypeError):
            quick_init(cls)


def test_packets_built_per_message_keep_their_dataclass_behaviour():
    packet = Publish(topic="a", payload=b"p", qos=QoS.AT_LEAST_ONCE, packet_id=3)
    assert (packet.retain, packet.dup, packet.properties) == (False, False, NO_PROPERTIES)
    assert PubAck(packet_id=3) == PubAck(packet_id=3, reason_code=ReasonCode.SUCCESS)
    assert PubAck(packet_id=3).packet_type is PacketType.PUBACK
    with pytest.raises(TypeError):
        Publish("a")  # type: ignore[misc]  # keyword-only, as generated


@pytest.mark.parametrize("level", [V3, V5])
@pytest.mark.parametrize(
    "data", [h("40020007"), h("40020000"), h("4003000710"), h("4004000787 00"), h("400100")]
)
def test_puback_hot_path_agrees_with_the_generic_path(level, data):
    fast, generic = fast_decode(data, level), generic_decode(data, level)
    if isinstance(generic, ProtocolError):
        assert isinstance(fast, type(generic)) and fast.message == generic.message
    else:
        assert fast == generic


def test_publish_and_puback_before_connect_are_still_refused():
    for data in (publish_frame(0x30, b"a", b"x"), h("40020001")):
        assert "must be CONNECT" in decode_error(data).message


@pytest.mark.parametrize("level", [V3, V5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("size", [0, 60, 200, 20000])
def test_encode_publish_is_byte_for_byte_encode(level, qos, retain, size):
    props = (
        Properties(content_type="text/plain", user_properties=(("k", "v"),))
        if level == V5 and size == 60
        else NO_PROPERTIES
    )
    packet = Publish(
        topic="devices/d1/telemetry",
        payload=bytes(range(256)) * (size // 256) + b"p" * (size % 256),
        qos=QoS(qos),
        retain=retain,
        dup=qos == 2,
        packet_id=9 if qos else None,
        properties=props,
    )
    ours = encode_publish(
        packet.topic,
        packet.payload,
        packet.qos,
        packet.retain,
        packet.packet_id,
        packet.properties,
        ProtocolLevel(level),
        dup=packet.dup,
    )
    assert ours == encode(packet, level)
