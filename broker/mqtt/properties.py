"""MQTT 5 properties on the wire (spec section 2.2.2): identifiers, data types, and which packet
may carry which property.

A property that is not allowed in its packet is a malformed packet; a property given twice is a
protocol error, except User Property and (in PUBLISH) Subscription Identifier, which repeat.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import Any, Literal, TypeAlias

from broker.mqtt._wire import (
    Reader,
    malformed,
    write_binary,
    write_uint16,
    write_uint32,
    write_utf8,
    write_varint,
)
from broker.mqtt.errors import MalformedPacket, ProtocolError
from broker.mqtt.packets import NO_PROPERTIES, PacketType, Properties, ReasonCode
from fleetgate.topics import InvalidTopic, validate_topic_name


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class DataType(Enum):
    BYTE = "byte"
    TWO_BYTE_INTEGER = "two byte integer"
    FOUR_BYTE_INTEGER = "four byte integer"
    VARIABLE_BYTE_INTEGER = "variable byte integer"
    UTF8_STRING = "UTF-8 string"
    BINARY_DATA = "binary data"
    UTF8_STRING_PAIR = "UTF-8 string pair"


_P = PropertyId
_T = DataType

# Identifier -> (Properties field, data type), in identifier order, which is also the order they
# are encoded in.
FIELDS: dict[PropertyId, tuple[str, DataType]] = {
    _P.PAYLOAD_FORMAT_INDICATOR: ("payload_format_indicator", _T.BYTE),
    _P.MESSAGE_EXPIRY_INTERVAL: ("message_expiry_interval", _T.FOUR_BYTE_INTEGER),
    _P.CONTENT_TYPE: ("content_type", _T.UTF8_STRING),
    _P.RESPONSE_TOPIC: ("response_topic", _T.UTF8_STRING),
    _P.CORRELATION_DATA: ("correlation_data", _T.BINARY_DATA),
    _P.SUBSCRIPTION_IDENTIFIER: ("subscription_identifiers", _T.VARIABLE_BYTE_INTEGER),
    _P.SESSION_EXPIRY_INTERVAL: ("session_expiry_interval", _T.FOUR_BYTE_INTEGER),
    _P.ASSIGNED_CLIENT_IDENTIFIER: ("assigned_client_identifier", _T.UTF8_STRING),
    _P.SERVER_KEEP_ALIVE: ("server_keep_alive", _T.TWO_BYTE_INTEGER),
    _P.AUTHENTICATION_METHOD: ("authentication_method", _T.UTF8_STRING),
    _P.AUTHENTICATION_DATA: ("authentication_data", _T.BINARY_DATA),
    _P.REQUEST_PROBLEM_INFORMATION: ("request_problem_information", _T.BYTE),
    _P.WILL_DELAY_INTERVAL: ("will_delay_interval", _T.FOUR_BYTE_INTEGER),
    _P.REQUEST_RESPONSE_INFORMATION: ("request_response_information", _T.BYTE),
    _P.RESPONSE_INFORMATION: ("response_information", _T.UTF8_STRING),
    _P.SERVER_REFERENCE: ("server_reference", _T.UTF8_STRING),
    _P.REASON_STRING: ("reason_string", _T.UTF8_STRING),
    _P.RECEIVE_MAXIMUM: ("receive_maximum", _T.TWO_BYTE_INTEGER),
    _P.TOPIC_ALIAS_MAXIMUM: ("topic_alias_maximum", _T.TWO_BYTE_INTEGER),
    _P.TOPIC_ALIAS: ("topic_alias", _T.TWO_BYTE_INTEGER),
    _P.MAXIMUM_QOS: ("maximum_qos", _T.BYTE),
    _P.RETAIN_AVAILABLE: ("retain_available", _T.BYTE),
    _P.USER_PROPERTY: ("user_properties", _T.UTF8_STRING_PAIR),
    _P.MAXIMUM_PACKET_SIZE: ("maximum_packet_size", _T.FOUR_BYTE_INTEGER),
    _P.WILDCARD_SUBSCRIPTION_AVAILABLE: ("wildcard_subscription_available", _T.BYTE),
    _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: ("subscription_identifier_available", _T.BYTE),
    _P.SHARED_SUBSCRIPTION_AVAILABLE: ("shared_subscription_available", _T.BYTE),
}

# Byte properties the Properties class exposes as booleans; every byte property is 0 or 1.
_FLAGS = frozenset(
    {
        _P.REQUEST_PROBLEM_INFORMATION,
        _P.REQUEST_RESPONSE_INFORMATION,
        _P.RETAIN_AVAILABLE,
        _P.WILDCARD_SUBSCRIPTION_AVAILABLE,
        _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        _P.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)
_REPEATABLE = frozenset({_P.USER_PROPERTY, _P.SUBSCRIPTION_IDENTIFIER})
_NON_ZERO = (
    _P.RECEIVE_MAXIMUM,
    _P.MAXIMUM_PACKET_SIZE,
    _P.TOPIC_ALIAS,
)

# Will properties travel in CONNECT but have their own set.
Context: TypeAlias = PacketType | Literal["will"]
WILL: Literal["will"] = "will"

_MESSAGE = {
    _P.PAYLOAD_FORMAT_INDICATOR,
    _P.MESSAGE_EXPIRY_INTERVAL,
    _P.CONTENT_TYPE,
    _P.RESPONSE_TOPIC,
    _P.CORRELATION_DATA,
    _P.USER_PROPERTY,
}
_REASON = {_P.REASON_STRING, _P.USER_PROPERTY}
_AUTH = {_P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA}

ALLOWED: dict[Context, frozenset[PropertyId]] = {
    PacketType.CONNECT: frozenset(
        {
            _P.SESSION_EXPIRY_INTERVAL,
            _P.RECEIVE_MAXIMUM,
            _P.MAXIMUM_PACKET_SIZE,
            _P.TOPIC_ALIAS_MAXIMUM,
            _P.REQUEST_RESPONSE_INFORMATION,
            _P.REQUEST_PROBLEM_INFORMATION,
            _P.USER_PROPERTY,
            *_AUTH,
        }
    ),
    WILL: frozenset({*_MESSAGE, _P.WILL_DELAY_INTERVAL}),
    PacketType.CONNACK: frozenset(
        {
            _P.SESSION_EXPIRY_INTERVAL,
            _P.ASSIGNED_CLIENT_IDENTIFIER,
            _P.SERVER_KEEP_ALIVE,
            _P.RESPONSE_INFORMATION,
            _P.SERVER_REFERENCE,
            _P.RECEIVE_MAXIMUM,
            _P.TOPIC_ALIAS_MAXIMUM,
            _P.MAXIMUM_QOS,
            _P.RETAIN_AVAILABLE,
            _P.MAXIMUM_PACKET_SIZE,
            _P.WILDCARD_SUBSCRIPTION_AVAILABLE,
            _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            _P.SHARED_SUBSCRIPTION_AVAILABLE,
            *_REASON,
            *_AUTH,
        }
    ),
    PacketType.PUBLISH: frozenset({*_MESSAGE, _P.TOPIC_ALIAS, _P.SUBSCRIPTION_IDENTIFIER}),
    PacketType.PUBACK: frozenset(_REASON),
    PacketType.PUBREC: frozenset(_REASON),
    PacketType.PUBREL: frozenset(_REASON),
    PacketType.PUBCOMP: frozenset(_REASON),
    PacketType.SUBSCRIBE: frozenset({_P.SUBSCRIPTION_IDENTIFIER, _P.USER_PROPERTY}),
    PacketType.SUBACK: frozenset(_REASON),
    PacketType.UNSUBSCRIBE: frozenset({_P.USER_PROPERTY}),
    PacketType.UNSUBACK: frozenset(_REASON),
    PacketType.DISCONNECT: frozenset(
        {_P.SESSION_EXPIRY_INTERVAL, _P.SERVER_REFERENCE, *_REASON},
    ),
    PacketType.AUTH: frozenset({*_AUTH, *_REASON}),
}


def _name(context: Context) -> str:
    return "will properties" if context == WILL else f"{context.name} properties"


# Per context, the (property, field) pairs that must be absent.
_DISALLOWED = {
    context: tuple((prop, name) for prop, (name, _) in FIELDS.items() if prop not in allowed)
    for context, allowed in ALLOWED.items()
}


def check_properties(properties: Properties, context: Context) -> None:
    """Apply the rules on property values that hold whichever side encoded them."""
    if properties is NO_PROPERTIES:
        return  # the common case on the hot path: nothing to check
    for prop, name in _DISALLOWED[context]:
        value = getattr(properties, name)
        if value is not None and value != ():
            raise malformed(f"{prop.name} is not allowed in {_name(context)}")
    for prop in (_P.PAYLOAD_FORMAT_INDICATOR, _P.MAXIMUM_QOS):
        if getattr(properties, FIELDS[prop][0]) not in (None, 0, 1):
            raise ProtocolError(ReasonCode.PROTOCOL_ERROR, f"{prop.name} must be 0 or 1")
    for prop in _NON_ZERO:
        if getattr(properties, FIELDS[prop][0]) == 0:
            raise ProtocolError(ReasonCode.PROTOCOL_ERROR, f"{prop.name} must not be 0")
    if 0 in properties.subscription_identifiers:
        raise ProtocolError(ReasonCode.PROTOCOL_ERROR, "SUBSCRIPTION_IDENTIFIER must not be 0")
    if context == PacketType.SUBSCRIBE and len(properties.subscription_identifiers) > 1:
        raise ProtocolError(
            ReasonCode.PROTOCOL_ERROR, "SUBSCRIBE carries at most one SUBSCRIPTION_IDENTIFIER"
        )
    if properties.authentication_data is not None and properties.authentication_method is None:
        raise ProtocolError(
            ReasonCode.PROTOCOL_ERROR, "AUTHENTICATION_DATA without AUTHENTICATION_METHOD"
        )
    if properties.response_topic is not None:
        try:
            validate_topic_name(properties.response_topic)
        except InvalidTopic as exc:
            raise MalformedPacket(ReasonCode.TOPIC_NAME_INVALID, f"RESPONSE_TOPIC: {exc}") from None


def _read_value(reader: Reader, prop: PropertyId, data_type: DataType) -> Any:
    match data_type:
        case _T.BYTE:
            value = reader.byte()
            if value > 1:
                raise ProtocolError(ReasonCode.PROTOCOL_ERROR, f"{prop.name} must be 0 or 1")
            return bool(value) if prop in _FLAGS else value
        case _T.TWO_BYTE_INTEGER:
            return reader.uint16()
        case _T.FOUR_BYTE_INTEGER:
            return reader.uint32()
        case _T.VARIABLE_BYTE_INTEGER:
            return reader.varint()
        case _T.UTF8_STRING:
            return reader.utf8()
        case _T.BINARY_DATA:
            return reader.binary()
        case _T.UTF8_STRING_PAIR:
            return (reader.utf8(), reader.utf8())


def decode_properties(reader: Reader, context: Context) -> Properties:
    """Read a property length and that many bytes of properties."""
    length = reader.varint()
    if length == 0:
        return NO_PROPERTIES
    block = reader.sub(length)
    values: dict[str, Any] = {}
    repeated: dict[str, list[Any]] = {"user_properties": [], "subscription_identifiers": []}
    while block.remaining:
        identifier = block.varint()
        try:
            prop = PropertyId(identifier)
        except ValueError:
            raise malformed(f"unknown property identifier 0x{identifier:02x}") from None
        if prop not in ALLOWED[context]:
            raise malformed(f"{prop.name} is not allowed in {_name(context)}")
        field, data_type = FIELDS[prop]
        value = _read_value(block, prop, data_type)
        if prop in _REPEATABLE:
            repeated[field].append(value)
        elif field in values:
            raise ProtocolError(
                ReasonCode.PROTOCOL_ERROR, f"{prop.name} appears twice in {_name(context)}"
            )
        else:
            values[field] = value
    # The decoded packet's properties are checked with the whole packet (check_properties).
    return Properties(
        **values,
        user_properties=tuple(repeated["user_properties"]),
        subscription_identifiers=tuple(repeated["subscription_identifiers"]),
    )


def _write_value(data_type: DataType, value: Any) -> bytes:
    match data_type:
        case _T.BYTE:
            return bytes([int(value)])
        case _T.TWO_BYTE_INTEGER:
            return write_uint16(value)
        case _T.FOUR_BYTE_INTEGER:
            return write_uint32(value)
        case _T.VARIABLE_BYTE_INTEGER:
            return write_varint(value)
        case _T.UTF8_STRING:
            return write_utf8(value)
        case _T.BINARY_DATA:
            return write_binary(value)
        case _T.UTF8_STRING_PAIR:
            return write_utf8(value[0]) + write_utf8(value[1])


def encode_properties(properties: Properties) -> bytes:
    """Property length and properties, in identifier order; call :func:`check_properties` first."""
    if properties is NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for prop, (field, data_type) in FIELDS.items():
        value = getattr(properties, field)
        values = value if prop in _REPEATABLE else () if value is None else (value,)
        for item in values:
            out += write_varint(prop) + _write_value(data_type, item)
    return write_varint(len(out)) + out
