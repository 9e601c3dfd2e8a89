"""Sans-I/O MQTT 3.1.1 / 5.0 codec: :func:`encode` turns a packet into bytes, :class:`Decoder`
turns a byte stream into packets.

Nothing here touches a socket or a clock, so the broker, a bridge and a simulator share it and
fuzzing needs no network. Both directions run the same checks (:func:`_check`): what the decoder
refuses from a peer, the encoder refuses to send, with :class:`ValueError` as it is a local bug.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeAlias

from broker.mqtt._wire import (
    MAX_VARINT,
    Reader,
    decode_varint,
    malformed,
    write_binary,
    write_uint16,
    write_utf8,
    write_varint,
)
from broker.mqtt.errors import (
    MalformedPacket,
    PacketTooLarge,
    ProtocolError,
    UnsupportedProtocolVersion,
)
from broker.mqtt.packets import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    ConnackReturnCodeV3,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    ProtocolLevel,
    PubAck,
    PubComp,
    Publish,
    PublishResponse,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    RetainHandling,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)
from broker.mqtt.properties import (
    WILL,
    Context,
    check_properties,
    decode_properties,
    encode_properties,
)
from fleetgate.topics import (
    SHARE_PREFIX,
    InvalidTopic,
    validate_topic_filter,
    validate_topic_name,
)

PlainPublish: TypeAlias = tuple[str, bytes, QoS, bool, bool, int | None]
"""The common PUBLISH (a topic name, no properties) as :meth:`Decoder.next_item` returns it:
``(topic, payload, qos, retain, dup, packet_id)``, the fields of the :class:`Publish` that
:meth:`Decoder.next_packet` makes of it. The tuple is built in ~0.1 µs, a Publish in ~0.9."""

MAX_PACKET_SIZE = 1 + 4 + MAX_VARINT
"""The largest packet the protocol can express: fixed header byte, 4-byte length, body."""

_V3 = ProtocolLevel.MQTT_3_1_1
_V5 = ProtocolLevel.MQTT_5
_R = ReasonCode
_FLAGS_0010 = frozenset({PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE})
_LEVELS = frozenset(ProtocolLevel)
# Enum construction by value costs about a microsecond; the decoder's hot path indexes instead.
_PACKET_TYPES = {int(t): t for t in PacketType}
_PUBLISH = PacketType.PUBLISH
_PUBACK = PacketType.PUBACK
_QOS_BY_VALUE = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE)
_RESPONSES: dict[PacketType, type[PubAck] | type[PubRec] | type[PubRel] | type[PubComp]] = {
    PacketType.PUBACK: PubAck,
    PacketType.PUBREC: PubRec,
    PacketType.PUBREL: PubRel,
    PacketType.PUBCOMP: PubComp,
}

# Which reason codes each packet may carry (MQTT 5 sections 3.2.2.2 to 3.15.2.1).
_PUBACK_REASONS = frozenset(
    {
        _R.SUCCESS,
        _R.NO_MATCHING_SUBSCRIBERS,
        _R.UNSPECIFIED_ERROR,
        _R.IMPLEMENTATION_SPECIFIC_ERROR,
        _R.NOT_AUTHORIZED,
        _R.TOPIC_NAME_INVALID,
        _R.PACKET_IDENTIFIER_IN_USE,
        _R.QUOTA_EXCEEDED,
        _R.PAYLOAD_FORMAT_INVALID,
    }
)
_PUBREL_REASONS = frozenset({_R.SUCCESS, _R.PACKET_IDENTIFIER_NOT_FOUND})
_REASONS_V5: dict[PacketType, frozenset[ReasonCode]] = {
    PacketType.CONNACK: frozenset(
        {
            _R.SUCCESS,
            *(code for code in _R if 0x80 <= code <= 0x8A),
            _R.BAD_AUTHENTICATION_METHOD,
            _R.TOPIC_NAME_INVALID,
            _R.PACKET_TOO_LARGE,
            _R.QUOTA_EXCEEDED,
            _R.PAYLOAD_FORMAT_INVALID,
            _R.RETAIN_NOT_SUPPORTED,
            _R.QOS_NOT_SUPPORTED,
            _R.USE_ANOTHER_SERVER,
            _R.SERVER_MOVED,
            _R.CONNECTION_RATE_EXCEEDED,
        }
    ),
    PacketType.PUBACK: _PUBACK_REASONS,
    PacketType.PUBREC: _PUBACK_REASONS,
    PacketType.PUBREL: _PUBREL_REASONS,
    PacketType.PUBCOMP: _PUBREL_REASONS,
    PacketType.SUBACK: frozenset(
        {
            _R.GRANTED_QOS_0,
            _R.GRANTED_QOS_1,
            _R.GRANTED_QOS_2,
            _R.UNSPECIFIED_ERROR,
            _R.IMPLEMENTATION_SPECIFIC_ERROR,
            _R.NOT_AUTHORIZED,
            _R.TOPIC_FILTER_INVALID,
            _R.PACKET_IDENTIFIER_IN_USE,
            _R.QUOTA_EXCEEDED,
            _R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
            _R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            _R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
        }
    ),
    PacketType.UNSUBACK: frozenset(
        {
            _R.SUCCESS,
            _R.NO_SUBSCRIPTION_EXISTED,
            _R.UNSPECIFIED_ERROR,
            _R.IMPLEMENTATION_SPECIFIC_ERROR,
            _R.NOT_AUTHORIZED,
            _R.TOPIC_FILTER_INVALID,
            _R.PACKET_IDENTIFIER_IN_USE,
        }
    ),
    PacketType.DISCONNECT: frozenset(
        {
            _R.NORMAL_DISCONNECTION,
            _R.DISCONNECT_WITH_WILL_MESSAGE,
            *(code for code in _R if 0x80 <= code <= 0x83),
            _R.NOT_AUTHORIZED,
            _R.SERVER_BUSY,
            *(code for code in _R if 0x8B <= code <= 0x90 and code != _R.BAD_AUTHENTICATION_METHOD),
            *(code for code in _R if 0x93 <= code <= 0xA2),
        }
    ),
    PacketType.AUTH: frozenset({_R.SUCCESS, _R.CONTINUE_AUTHENTICATION, _R.RE_AUTHENTICATE}),
}
_REASONS_V3: dict[PacketType, frozenset[ReasonCode]] = {
    **dict.fromkeys(_RESPONSES, frozenset({_R.SUCCESS})),
    PacketType.SUBACK: frozenset(
        {_R.GRANTED_QOS_0, _R.GRANTED_QOS_1, _R.GRANTED_QOS_2, _R.UNSPECIFIED_ERROR}
    ),
    PacketType.UNSUBACK: frozenset(),
    PacketType.DISCONNECT: frozenset({_R.NORMAL_DISCONNECTION}),
}

# CONNACK codes carried across versions, so the broker can always speak in ReasonCode.
_CONNACK_V3_FROM_V5 = {
    _R.SUCCESS: ConnackReturnCodeV3.ACCEPTED,
    _R.UNSUPPORTED_PROTOCOL_VERSION: ConnackReturnCodeV3.UNACCEPTABLE_PROTOCOL_VERSION,
    _R.CLIENT_IDENTIFIER_NOT_VALID: ConnackReturnCodeV3.IDENTIFIER_REJECTED,
    _R.SERVER_UNAVAILABLE: ConnackReturnCodeV3.SERVER_UNAVAILABLE,
    _R.SERVER_BUSY: ConnackReturnCodeV3.SERVER_UNAVAILABLE,
    _R.BAD_USER_NAME_OR_PASSWORD: ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD,
    _R.NOT_AUTHORIZED: ConnackReturnCodeV3.NOT_AUTHORIZED,
    _R.BANNED: ConnackReturnCodeV3.NOT_AUTHORIZED,
}
_CONNACK_V5_FROM_V3 = {
    ConnackReturnCodeV3.ACCEPTED: _R.SUCCESS,
    ConnackReturnCodeV3.UNACCEPTABLE_PROTOCOL_VERSION: _R.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackReturnCodeV3.IDENTIFIER_REJECTED: _R.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackReturnCodeV3.SERVER_UNAVAILABLE: _R.SERVER_UNAVAILABLE,
    ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD: _R.BAD_USER_NAME_OR_PASSWORD,
    ConnackReturnCodeV3.NOT_AUTHORIZED: _R.NOT_AUTHORIZED,
}


def _protocol_error(message: str) -> ProtocolError:
    return ProtocolError(ReasonCode.PROTOCOL_ERROR, message)


# --- checks shared by both directions ---------------------------------------------------------


def _check_properties(properties: Properties, context: Context, level: ProtocolLevel) -> None:
    if level is _V5:
        check_properties(properties, context)
    elif properties != NO_PROPERTIES:
        raise _protocol_error("MQTT 3.1.1 packets carry no properties")


def _check_reasons(
    packet_type: PacketType, codes: tuple[ReasonCode, ...], level: ProtocolLevel
) -> None:
    allowed = (_REASONS_V5 if level is _V5 else _REASONS_V3)[packet_type]
    for code in codes:
        if code not in allowed:
            raise malformed(f"reason code 0x{code:02x} is not allowed in {packet_type.name}")


def _check_packet_id(packet_id: int | None) -> None:
    if not packet_id:
        raise _protocol_error("packet identifier must be non-zero")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise malformed(f"QoS {qos} does not exist")


def _check_topic_name(name: str) -> None:
    try:
        validate_topic_name(name)
    except InvalidTopic as exc:
        raise MalformedPacket(ReasonCode.TOPIC_NAME_INVALID, str(exc)) from None


def _check_topic_filter(topic_filter: str) -> None:
    try:
        validate_topic_filter(topic_filter)
    except InvalidTopic as exc:
        raise MalformedPacket(ReasonCode.TOPIC_FILTER_INVALID, str(exc)) from None


def _connack_code(code: ReasonCode | ConnackReturnCodeV3, level: ProtocolLevel) -> int:
    """The CONNACK byte for ``code`` at ``level``, converting between the two enums."""
    if level is _V3:
        if isinstance(code, ConnackReturnCodeV3):
            return code
        if code not in _CONNACK_V3_FROM_V5:
            raise _protocol_error(f"{code.name} has no 3.1.1 CONNACK return code; just close")
        return _CONNACK_V3_FROM_V5[code]
    reason = _CONNACK_V5_FROM_V3[code] if isinstance(code, ConnackReturnCodeV3) else code
    _check_reasons(PacketType.CONNACK, (reason,), level)
    return reason


def _check_will(will: Will, level: ProtocolLevel) -> None:
    _check_qos(will.qos)
    _check_topic_name(will.topic)
    _check_properties(will.properties, WILL, level)


def _check_publish(packet: Publish, level: ProtocolLevel) -> None:
    _check_qos(packet.qos)
    if packet.qos == QoS.AT_MOST_ONCE:
        if packet.packet_id is not None:
            raise _protocol_error("a QoS 0 PUBLISH has no packet identifier")
        if packet.dup:
            raise _protocol_error("DUP must be 0 on a QoS 0 PUBLISH")
    else:
        _check_packet_id(packet.packet_id)
    if packet.topic:
        _check_topic_name(packet.topic)
    elif level is _V3 or packet.properties.topic_alias is None:
        raise _protocol_error("empty topic name without a topic alias")
    _check_properties(packet.properties, PacketType.PUBLISH, level)


def _check_subscription(subscription: Subscription, level: ProtocolLevel) -> None:
    _check_qos(subscription.qos)
    _check_topic_filter(subscription.topic_filter)
    if subscription.retain_handling not in (0, 1, 2):
        raise _protocol_error(f"retain handling {subscription.retain_handling} does not exist")
    v5_options = (
        subscription.no_local,
        subscription.retain_as_published,
        subscription.retain_handling,
    )
    if level is _V3 and any(v5_options):
        raise _protocol_error("3.1.1 subscriptions carry only a QoS")
    if subscription.no_local and subscription.topic_filter.startswith(SHARE_PREFIX):
        raise _protocol_error("no-local on a shared subscription")


def _check(packet: Packet, level: ProtocolLevel) -> None:
    """Rules on a whole packet, independent of how its bytes were laid out."""
    match packet:
        case Connect():
            _check_properties(packet.properties, PacketType.CONNECT, level)
            if packet.will is not None:
                _check_will(packet.will, level)
            if level is _V3 and packet.password is not None and packet.username is None:
                raise malformed("3.1.1 forbids a password without a user name")
        case ConnAck():
            _check_properties(packet.properties, PacketType.CONNACK, level)
            refused = _connack_code(packet.reason_code, level) != 0
            if packet.session_present and refused:
                raise _protocol_error("session present on a refused connection")
        case Publish():
            _check_publish(packet, level)
        case PublishResponse():
            _check_packet_id(packet.packet_id)
            _check_reasons(packet.packet_type, (packet.reason_code,), level)
            _check_properties(packet.properties, packet.packet_type, level)
        case Subscribe():
            _check_packet_id(packet.packet_id)
            if not packet.subscriptions:
                raise _protocol_error("SUBSCRIBE without topic filters")
            for subscription in packet.subscriptions:
                _check_subscription(subscription, level)
            _check_properties(packet.properties, PacketType.SUBSCRIBE, level)
        case SubAck() | UnsubAck():
            _check_packet_id(packet.packet_id)
            if not packet.reason_codes and (level is _V5 or isinstance(packet, SubAck)):
                raise _protocol_error(f"{packet.packet_type.name} without reason codes")
            _check_reasons(packet.packet_type, packet.reason_codes, level)
            _check_properties(packet.properties, packet.packet_type, level)
        case Unsubscribe():
            _check_packet_id(packet.packet_id)
            if not packet.topic_filters:
                raise _protocol_error("UNSUBSCRIBE without topic filters")
            for topic_filter in packet.topic_filters:
                _check_topic_filter(topic_filter)
            _check_properties(packet.properties, PacketType.UNSUBSCRIBE, level)
        case Disconnect() | Auth():
            if level is _V3 and isinstance(packet, Auth):
                raise _protocol_error("AUTH does not exist in MQTT 3.1.1")
            _check_reasons(packet.packet_type, (packet.reason_code,), level)
            _check_properties(packet.properties, packet.packet_type, level)
        case PingReq() | PingResp():
            pass


# --- encoding ---------------------------------------------------------------------------------


def _properties_bytes(properties: Properties, level: ProtocolLevel) -> bytes:
    return encode_properties(properties) if level is _V5 else b""


def _encode_connect(packet: Connect, level: ProtocolLevel) -> bytes:
    will = packet.will
    flags = (
        (0x80 if packet.username is not None else 0)
        | (0x40 if packet.password is not None else 0)
        | (0x02 if packet.clean_start else 0)
    )
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
    body = write_utf8("MQTT") + bytes([level, flags]) + write_uint16(packet.keep_alive)
    body += _properties_bytes(packet.properties, level) + write_utf8(packet.client_id)
    if will is not None:
        body += _properties_bytes(will.properties, level)
        body += write_utf8(will.topic) + write_binary(will.payload)
    if packet.username is not None:
        body += write_utf8(packet.username)
    if packet.password is not None:
        body += write_binary(packet.password)
    return body


def _encode_reason_and_properties(
    reason: ReasonCode, properties: Properties, level: ProtocolLevel
) -> bytes:
    """The MQTT 5 tail that may be left out when it says "success, no properties"."""
    if level is _V3 or (reason == ReasonCode.SUCCESS and properties == NO_PROPERTIES):
        return b""
    if properties == NO_PROPERTIES:
        return bytes([reason])
    return bytes([reason]) + encode_properties(properties)


def _encode_body(packet: Packet, level: ProtocolLevel) -> tuple[int, bytes]:
    """The fixed header's flag nibble and the packet's body."""
    match packet:
        case Connect():
            return 0, _encode_connect(packet, level)
        case ConnAck():
            code = _connack_code(packet.reason_code, level)
            head = bytes([1 if packet.session_present else 0, code])
            return 0, head + _properties_bytes(packet.properties, level)
        case Publish():
            flags = (8 if packet.dup else 0) | packet.qos << 1 | (1 if packet.retain else 0)
            body = write_utf8(packet.topic)
            if packet.packet_id is not None:
                body += write_uint16(packet.packet_id)
            body += _properties_bytes(packet.properties, level)
            return flags, body + packet.payload
        case PublishResponse():
            flags = 0b0010 if isinstance(packet, PubRel) else 0
            tail = _encode_reason_and_properties(packet.reason_code, packet.properties, level)
            return flags, write_uint16(packet.packet_id) + tail
        case Subscribe():
            body = write_uint16(packet.packet_id) + _properties_bytes(packet.properties, level)
            for sub in packet.subscriptions:
                options = (
                    sub.qos
                    | (4 if sub.no_local else 0)
                    | (8 if sub.retain_as_published else 0)
                    | sub.retain_handling << 4
                )
                body += write_utf8(sub.topic_filter) + bytes([options])
            return 0b0010, body
        case SubAck() | UnsubAck():
            body = write_uint16(packet.packet_id) + _properties_bytes(packet.properties, level)
            return 0, body + bytes(packet.reason_codes)
        case Unsubscribe():
            body = write_uint16(packet.packet_id) + _properties_bytes(packet.properties, level)
            return 0b0010, body + b"".join(write_utf8(f) for f in packet.topic_filters)
        case Disconnect():
            return 0, _encode_reason_and_properties(packet.reason_code, packet.properties, level)
        case Auth():
            if packet.reason_code == ReasonCode.SUCCESS and packet.properties == NO_PROPERTIES:
                return 0, b""
            return 0, bytes([packet.reason_code]) + encode_properties(packet.properties)
        case PingReq() | PingResp():
            return 0, b""


def encode(packet: Packet, protocol_level: int, *, validate: bool = True) -> bytes:
    """The packet's bytes for MQTT 3.1.1 (level 4) or 5.0 (level 5).

    Raises :class:`ValueError` for a packet the spec forbids or that the level cannot express.
    ``validate=False`` skips those rules for a packet built only from values this side already
    validated (a broker forwarding a decoded PUBLISH, an acknowledgement): the hot path.
    """
    level = (
        protocol_level
        if isinstance(protocol_level, ProtocolLevel)
        else ProtocolLevel(protocol_level)
    )
    if validate:
        try:
            _check(packet, level)
        except ProtocolError as exc:
            raise ValueError(f"cannot encode {type(packet).__name__}: {exc.message}") from exc
    flags, body = _encode_body(packet, level)
    if len(body) > MAX_VARINT:
        raise ValueError(f"{type(packet).__name__} of {len(body)} bytes is too large for MQTT")
    return bytes([packet.packet_type << 4 | flags]) + write_varint(len(body)) + body


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    packet_id: int | None,
    properties: Properties,
    protocol_level: ProtocolLevel,
    *,
    dup: bool = False,
    topic_alias: int | None = None,
) -> bytes:
    """PUBLISH bytes straight from already-validated fields, without a :class:`Publish`: the
    broker's per-delivery path. The same bytes as ``encode(Publish(...), level)`` with
    ``topic_alias`` in its properties (MQTT 5 only; the caller keeps the alias map)."""
    name = topic.encode()
    if protocol_level is _V5:
        if topic_alias is not None:
            props = _alias_properties(properties, topic_alias)
        elif properties is NO_PROPERTIES:
            props = b"\x00"
        else:
            props = encode_properties(properties)
    else:
        props = b""
    size = len(name)
    remaining = 2 + size + len(props) + len(payload)
    pid = b""
    if packet_id is not None:
        remaining += 2
        pid = packet_id.to_bytes(2, "big")
    first = 0x30 | (8 if dup else 0) | qos << 1 | (1 if retain else 0)
    if remaining < 0x80:
        head = bytes((first, remaining))
    else:
        if remaining > MAX_VARINT:
            raise ValueError(f"Publish of {remaining} bytes is too large for MQTT")
        head = bytes((first,)) + write_varint(remaining)
    return b"".join((head, size.to_bytes(2, "big"), name, pid, props, payload))


def _alias_properties(properties: Properties, alias: int) -> bytes:
    """A delivery's properties with a Topic Alias: the common case, no other property, is
    four constant-shaped bytes rather than a walk over every property field."""
    if properties is NO_PROPERTIES:
        return b"\x03\x23" + alias.to_bytes(2, "big")
    return encode_properties(replace(properties, topic_alias=alias))


# --- decoding ---------------------------------------------------------------------------------


def _read_reason(reader: Reader) -> ReasonCode:
    code = reader.byte()
    try:
        return ReasonCode(code)
    except ValueError:
        raise malformed(f"unknown reason code 0x{code:02x}") from None


def _read_properties(reader: Reader, context: Context, level: ProtocolLevel) -> Properties:
    return decode_properties(reader, context) if level is _V5 else NO_PROPERTIES


def _decode_connect(reader: Reader, level: ProtocolLevel) -> Connect:
    """CONNECT after the protocol name and level, which the decoder reads itself."""
    flags = reader.byte()
    if flags & 0x01:
        raise malformed("reserved CONNECT flag is set")
    will_flag, will_qos, will_retain = flags & 0x04, flags >> 3 & 3, flags & 0x20
    if will_qos == 3:
        raise malformed("will QoS 3 does not exist")
    if not will_flag and (will_qos or will_retain):
        raise malformed("will QoS or will retain set without the will flag")
    keep_alive = reader.uint16()
    properties = _read_properties(reader, PacketType.CONNECT, level)
    client_id = reader.utf8()
    will = None
    if will_flag:
        will_properties = _read_properties(reader, WILL, level)
        will = Will(
            topic=reader.utf8(),
            payload=reader.binary(),
            qos=QoS(will_qos),
            retain=bool(will_retain),
            properties=will_properties,
        )
    username = reader.utf8() if flags & 0x80 else None
    password = reader.binary() if flags & 0x40 else None
    reader.finish()
    return Connect(
        client_id=client_id,
        clean_start=bool(flags & 0x02),
        keep_alive=keep_alive,
        username=username,
        password=password,
        will=will,
        properties=properties,
    )


def _decode_connack(reader: Reader, level: ProtocolLevel) -> ConnAck:
    flags = reader.byte()
    if flags & 0xFE:
        raise malformed("reserved CONNACK flags are set")
    reason_code: ReasonCode | ConnackReturnCodeV3
    if level is _V5:
        reason_code = _read_reason(reader)
    else:
        code = reader.byte()
        try:
            reason_code = ConnackReturnCodeV3(code)
        except ValueError:
            raise malformed(f"unknown CONNACK return code {code}") from None
    properties = _read_properties(reader, PacketType.CONNACK, level)
    reader.finish()
    return ConnAck(session_present=bool(flags), reason_code=reason_code, properties=properties)


def _decode_publish(reader: Reader, flags: int, level: ProtocolLevel) -> Publish:
    qos = _QOS_BY_VALUE[flags >> 1 & 3]  # 3 was refused with the first byte
    topic = reader.utf8()
    packet_id = reader.uint16() if qos else None
    properties = _read_properties(reader, PacketType.PUBLISH, level)
    return Publish(
        topic=topic,
        payload=reader.rest(),
        qos=qos,
        retain=bool(flags & 1),
        dup=bool(flags & 8),
        packet_id=packet_id,
        properties=properties,
    )


def _decode_reason_and_properties(
    reader: Reader, packet_type: PacketType, level: ProtocolLevel
) -> tuple[ReasonCode, Properties]:
    """The optional MQTT 5 tail: both parts may be absent (see the encoder)."""
    reason, properties = ReasonCode.SUCCESS, NO_PROPERTIES
    if level is _V5 and reader.remaining:
        reason = _read_reason(reader)
        if reader.remaining:
            properties = decode_properties(reader, packet_type)
    reader.finish()
    return reason, properties


def _decode_subscribe(reader: Reader, level: ProtocolLevel) -> Subscribe:
    packet_id = reader.uint16()
    properties = _read_properties(reader, PacketType.SUBSCRIBE, level)
    reserved = 0xC0 if level is _V5 else 0xFC
    subscriptions = []
    while reader.remaining:
        topic_filter = reader.utf8()
        options = reader.byte()
        if options & reserved:
            raise malformed("reserved subscription option bits are set")
        if options & 3 == 3:
            raise malformed("QoS 3 does not exist")
        if options >> 4 & 3 == 3:
            raise _protocol_error("retain handling 3 does not exist")
        subscriptions.append(
            Subscription(
                topic_filter=topic_filter,
                qos=QoS(options & 3),
                no_local=bool(options & 4),
                retain_as_published=bool(options & 8),
                retain_handling=RetainHandling(options >> 4 & 3),
            )
        )
    return Subscribe(packet_id=packet_id, subscriptions=tuple(subscriptions), properties=properties)


def _read_reason_codes(reader: Reader) -> tuple[ReasonCode, ...]:
    codes = []
    while reader.remaining:
        codes.append(_read_reason(reader))
    return tuple(codes)


def _decode_packet(
    packet_type: PacketType, flags: int, reader: Reader, level: ProtocolLevel
) -> Packet:
    """Any packet but CONNECT, whose level the decoder needs first."""
    match packet_type:
        case PacketType.CONNACK:
            return _decode_connack(reader, level)
        case PacketType.PUBLISH:
            return _decode_publish(reader, flags, level)
        case PacketType.PUBACK | PacketType.PUBREC | PacketType.PUBREL | PacketType.PUBCOMP:
            packet_id = reader.uint16()
            reason, properties = _decode_reason_and_properties(reader, packet_type, level)
            return _RESPONSES[packet_type](
                packet_id=packet_id, reason_code=reason, properties=properties
            )
        case PacketType.SUBSCRIBE:
            return _decode_subscribe(reader, level)
        case PacketType.SUBACK:
            packet_id = reader.uint16()
            properties = _read_properties(reader, packet_type, level)
            return SubAck(
                packet_id=packet_id, reason_codes=_read_reason_codes(reader), properties=properties
            )
        case PacketType.UNSUBSCRIBE:
            packet_id = reader.uint16()
            properties = _read_properties(reader, packet_type, level)
            topic_filters = []
            while reader.remaining:
                topic_filters.append(reader.utf8())
            return Unsubscribe(
                packet_id=packet_id, topic_filters=tuple(topic_filters), properties=properties
            )
        case PacketType.UNSUBACK:
            packet_id = reader.uint16()
            if level is _V3:
                reader.finish()
                return UnsubAck(packet_id=packet_id)
            properties = decode_properties(reader, packet_type)
            return UnsubAck(
                packet_id=packet_id, reason_codes=_read_reason_codes(reader), properties=properties
            )
        case PacketType.PINGREQ | PacketType.PINGRESP:
            reader.finish()
            return PingReq() if packet_type is PacketType.PINGREQ else PingResp()
        case PacketType.DISCONNECT:
            reason, properties = _decode_reason_and_properties(reader, packet_type, level)
            return Disconnect(reason_code=reason, properties=properties)
        case PacketType.AUTH:
            if not reader.remaining:
                return Auth()
            reason = _read_reason(reader)
            properties = decode_properties(reader, packet_type)
            reader.finish()
            return Auth(reason_code=reason, properties=properties)
        case PacketType.CONNECT:
            raise AssertionError("CONNECT is decoded by Decoder")


class Decoder:
    """Incremental decoder for one direction of one connection.

    ``Decoder()`` is the server side: the first packet must be CONNECT, and its protocol level
    becomes the decoder's. ``Decoder(protocol_level=...)`` is the client side (or a server told
    the level out of band), which never accepts CONNECT. ``max_packet_size`` counts the whole
    packet, fixed header included, as MQTT 5's Maximum Packet Size does, and may be lowered once
    the connection's limits are known.
    """

    def __init__(
        self, protocol_level: int | None = None, *, max_packet_size: int = MAX_PACKET_SIZE
    ) -> None:
        self._level = None if protocol_level is None else ProtocolLevel(protocol_level)
        self._expect_connect = protocol_level is None
        self._buffer = bytearray()
        self.max_packet_size = max_packet_size

    @property
    def protocol_level(self) -> ProtocolLevel | None:
        """Known once CONNECT's level byte was read, even if the rest of CONNECT then failed,
        so that the server knows which CONNACK (if any) the client understands."""
        return self._level

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> Packet | None:
        """The next complete packet, or ``None`` until more bytes are fed.

        Raises :class:`ProtocolError` (or a subclass) as soon as the bytes seen so far are
        invalid; the connection should then be closed.
        """
        item = self.next_item()
        if isinstance(item, tuple):
            topic, payload, qos, retain, dup, packet_id = item
            return Publish(
                topic=topic, payload=payload, qos=qos, retain=retain, dup=dup, packet_id=packet_id
            )
        return item

    def next_item(self) -> Packet | PlainPublish | None:
        """:meth:`next_packet` for the broker's per-message path: the common PUBLISH comes as
        a :data:`PlainPublish` tuple instead of a :class:`Publish`; every other packet, and
        every error, is the same."""
        buffer = self._buffer
        if not buffer:
            return None
        first = buffer[0]
        # PUBLISH (QoS 0-2) and a bare PUBACK pass the first-byte checks by construction.
        hot = not self._expect_connect and (
            (first & 0xF0 == 0x30 and first & 6 != 6) or first == 0x40
        )
        packet_type = (
            (_PUBLISH if first != 0x40 else _PUBACK) if hot else self._check_first_byte(first)
        )
        if len(buffer) > 1 and buffer[1] < 0x80:  # a one-byte remaining length: most packets
            length, body_start = buffer[1], 2
        else:
            header = decode_varint(buffer, 1, len(buffer))
            if header is None:
                return None
            length, body_start = header
        size = body_start + length
        if size > self.max_packet_size:
            raise PacketTooLarge(size, self.max_packet_size)
        if len(buffer) < size:
            return None
        if hot:
            fast = (
                self._fast_puback(buffer, body_start, size)
                if first == 0x40
                else self._fast_publish(buffer, first, body_start, size)
            )
            if fast is not None:
                del buffer[:size]
                return fast
        reader = Reader(bytes(buffer[body_start:size]))
        packet = self._decode(packet_type, buffer[0] & 0x0F, reader)
        del buffer[:size]
        return packet

    def _fast_publish(
        self, buffer: bytearray, first: int, start: int, end: int
    ) -> PlainPublish | None:
        """The common PUBLISH (a topic name, no properties) without the generic reader.

        ``None`` means "not that case": the generic path then decodes or refuses the packet, so
        every error and every unusual packet is handled exactly as before.
        """
        if end - start < 2:
            return None
        topic_end = start + 2 + (buffer[start] << 8 | buffer[start + 1])
        qos = first >> 1 & 3
        at = topic_end + 2 if qos else topic_end
        if topic_end == start + 2 or at > end:
            return None
        if self._level is _V5:
            if at >= end or buffer[at]:
                return None
            at += 1
        try:
            topic = buffer[start + 2 : topic_end].decode()
        except UnicodeDecodeError:
            return None
        if "+" in topic or "#" in topic or "\x00" in topic:
            return None
        packet_id: int | None = None
        if qos:
            packet_id = buffer[topic_end] << 8 | buffer[topic_end + 1]
            if not packet_id:
                return None
        elif first & 8:
            return None
        return (
            topic,
            bytes(buffer[at:end]),
            _QOS_BY_VALUE[qos],
            first & 1 == 1,
            first & 8 == 8,
            packet_id,
        )

    @staticmethod
    def _fast_puback(buffer: bytearray, start: int, end: int) -> PubAck | None:
        """A PUBACK of two bytes: a non-zero packet id, success, no properties."""
        if end - start != 2:
            return None
        packet_id = buffer[start] << 8 | buffer[start + 1]
        return PubAck(packet_id=packet_id) if packet_id else None

    def _check_first_byte(self, first: int) -> PacketType:
        code, flags = first >> 4, first & 0x0F
        if code == 0 or (code == PacketType.AUTH and self._level is _V3):
            raise malformed(f"reserved packet type {code}")
        packet_type = _PACKET_TYPES[code]
        if self._expect_connect and packet_type is not PacketType.CONNECT:
            raise _protocol_error(f"the first packet must be CONNECT, not {packet_type.name}")
        if not self._expect_connect and packet_type is PacketType.CONNECT:
            raise _protocol_error("CONNECT is only allowed as the first packet from a client")
        if packet_type is PacketType.PUBLISH:
            if flags & 0b0110 == 0b0110:
                raise malformed("PUBLISH with QoS 3")
        elif flags != (0b0010 if packet_type in _FLAGS_0010 else 0):
            raise malformed(f"reserved flags 0b{flags:04b} on {packet_type.name}")
        return packet_type

    def _decode(self, packet_type: PacketType, flags: int, reader: Reader) -> Packet:
        packet: Packet
        if packet_type is PacketType.CONNECT:
            name = reader.utf8()
            level = reader.byte()
            if name != "MQTT" or level not in _LEVELS:
                raise UnsupportedProtocolVersion(level, name)
            self._level = ProtocolLevel(level)
            packet = _decode_connect(reader, self._level)
        else:
            assert self._level is not None  # set whenever CONNECT is not expected
            packet = _decode_packet(packet_type, flags, reader, self._level)
        _check(packet, self._level)
        self._expect_connect = False
        return packet
