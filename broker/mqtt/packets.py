"""MQTT control packets as plain immutable values, one class per packet type.

The classes carry no wire knowledge: the same value is encoded for MQTT 3.1.1 or 5.0 by
:func:`broker.mqtt.codec.encode`, which refuses fields the chosen version cannot carry (a reason
code or properties in 3.1.1) instead of dropping them silently.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from enum import IntEnum
from types import MemberDescriptorType
from typing import Any, ClassVar, TypeAlias, TypeVar

_V = TypeVar("_V")


def quick_init(cls: type[_V]) -> type[_V]:
    """Give a frozen, slotted dataclass an ``__init__`` that costs a third of the generated one.

    ``dataclass(frozen=True)`` sets each field with ``object.__setattr__(self, name, value)``,
    a generic attribute lookup per field: about 2.4 µs for a seven-field :class:`Publish` on the
    broker's machine, more than decoding one. This ``__init__`` has the same signature (positional
    and keyword-only fields, defaults) and sets each slot through its member descriptor directly
    (about 0.9 µs). The class stays a frozen dataclass: equality, hashing, ``replace`` and the
    refusal of assignments are unchanged. For the values built per message; fields with a
    ``default_factory`` or ``init=False``, a ``__post_init__`` and classes without slots are
    refused (``TypeError``).
    """
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has __post_init__")
    names: list[str] = []
    annotations: dict[str, Any] = {}
    positional: list[str] = []
    keyword: list[str] = []
    scope: dict[str, Any] = {}
    for field in fields(cls):  # type: ignore[arg-type]
        if not field.init or field.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{field.name}: only plain fields are supported")
        slot = getattr(cls, field.name)
        if not isinstance(slot, MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{field.name}: not a slot (use slots=True)")
        scope[f"_set_{field.name}"] = slot.__set__
        parameter = field.name
        if field.default is not MISSING:
            scope[f"_default_{field.name}"] = field.default
            parameter += f"=_default_{field.name}"
        (keyword if field.kw_only else positional).append(parameter)
        names.append(field.name)
        annotations[field.name] = field.type
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = (
        f"def make({', '.join(scope)}):\n"
        f"    def __init__({signature}):\n"
        + "".join(f"        _set_{name}(self, {name})\n" for name in names)
        + "    return __init__\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, {}, namespace)  # noqa: S102 (built from the class's own field names)
    init = namespace["make"](**scope)
    init.__annotations__ = {**annotations, "return": None}  # the signature, as generated
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class ProtocolLevel(IntEnum):
    """The protocol level byte of CONNECT; the only two versions this codec speaks."""

    MQTT_3_1_1 = 4
    MQTT_5 = 5


class PacketType(IntEnum):
    """The four high bits of a packet's first byte."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class QoS(IntEnum):
    AT_MOST_ONCE = 0
    AT_LEAST_ONCE = 1
    EXACTLY_ONCE = 2


class RetainHandling(IntEnum):
    """MQTT 5 subscription option: when retained messages are sent on subscribe."""

    SEND_ON_SUBSCRIBE = 0
    SEND_IF_NEW_SUBSCRIPTION = 1
    DO_NOT_SEND = 2


class ReasonCode(IntEnum):
    """MQTT 5 reason codes (spec table 2-6); 3.1.1 SUBACK codes are the same numbers."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackReturnCodeV3(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (spec table 3.1)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class Properties:
    """MQTT 5 properties; ``None`` (or an empty tuple) means the property is absent.

    One class for every packet keeps the broker's code uniform; which properties a given packet
    may carry is checked by :mod:`broker.mqtt.properties` when encoding and decoding.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: bool | None = None
    will_delay_interval: int | None = None
    request_response_information: bool | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: bool | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: bool | None = None
    subscription_identifier_available: bool | None = None
    shared_subscription_available: bool | None = None

    def __repr__(self) -> str:
        """Only the properties present, so logged packets stay readable."""
        present = (
            f"{field.name}={value!r}"
            for field in fields(self)
            if (value := getattr(self, field.name)) is not None and value != ()
        )
        return f"Properties({', '.join(present)})"


NO_PROPERTIES = Properties()


@dataclass(frozen=True, kw_only=True, slots=True)
class Will:
    """The message the server publishes if the client goes away without a clean DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: QoS = QoS.AT_MOST_ONCE
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class Connect:
    """``clean_start`` is 3.1.1's "clean session" bit; the protocol level is the encoder's."""

    packet_type: ClassVar[PacketType] = PacketType.CONNECT
    client_id: str = ""
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnAck:
    """3.1.1 decodes to a :class:`ConnackReturnCodeV3`; either enum encodes at either level."""

    packet_type: ClassVar[PacketType] = PacketType.CONNACK
    session_present: bool = False
    reason_code: ReasonCode | ConnackReturnCodeV3 = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class Publish:
    """``packet_id`` is ``None`` exactly when ``qos`` is 0."""

    packet_type: ClassVar[PacketType] = PacketType.PUBLISH
    topic: str
    payload: bytes = b""
    qos: QoS = QoS.AT_MOST_ONCE
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishResponse:
    """The four QoS 1/2 handshake packets share one shape."""

    packet_type: ClassVar[PacketType]
    packet_id: int
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class PubAck(PublishResponse):
    packet_type: ClassVar[PacketType] = PacketType.PUBACK


@dataclass(frozen=True, kw_only=True, slots=True)
class PubRec(PublishResponse):
    packet_type: ClassVar[PacketType] = PacketType.PUBREC


@dataclass(frozen=True, kw_only=True, slots=True)
class PubRel(PublishResponse):
    packet_type: ClassVar[PacketType] = PacketType.PUBREL


@dataclass(frozen=True, kw_only=True, slots=True)
class PubComp(PublishResponse):
    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP


@dataclass(frozen=True, kw_only=True, slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE; 3.1.1 carries only ``qos``."""

    topic_filter: str
    qos: QoS = QoS.AT_MOST_ONCE
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: RetainHandling = RetainHandling.SEND_ON_SUBSCRIBE


@dataclass(frozen=True, kw_only=True, slots=True)
class Subscribe:
    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class SubAck:
    """One reason code per requested filter; 3.1.1 allows only granted QoS 0-2 and 0x80."""

    packet_type: ClassVar[PacketType] = PacketType.SUBACK
    packet_id: int
    reason_codes: tuple[ReasonCode, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class Unsubscribe:
    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class UnsubAck:
    """MQTT 5 carries one reason code per filter; 3.1.1 carries none."""

    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK
    packet_id: int
    reason_codes: tuple[ReasonCode, ...] = ()
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class PingReq:
    packet_type: ClassVar[PacketType] = PacketType.PINGREQ


@dataclass(frozen=True, kw_only=True, slots=True)
class PingResp:
    packet_type: ClassVar[PacketType] = PacketType.PINGRESP


@dataclass(frozen=True, kw_only=True, slots=True)
class Disconnect:
    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: ReasonCode = ReasonCode.NORMAL_DISCONNECTION
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, kw_only=True, slots=True)
class Auth:
    """MQTT 5 only: enhanced authentication exchange."""

    packet_type: ClassVar[PacketType] = PacketType.AUTH
    reason_code: ReasonCode = ReasonCode.SUCCESS
    properties: Properties = NO_PROPERTIES


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
