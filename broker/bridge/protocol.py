"""The bridge's client side of one upstream MQTT connection, without I/O (the h11 shape).

Bytes in (:meth:`UpstreamSession.receive`) become events; what the bridge wants to say becomes
bytes, through the same :mod:`broker.mqtt` codec the broker uses. The asyncio shell that owns
the socket is :mod:`broker.bridge.link`.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.bridge.queue import Queued
from broker.mqtt import (
    NO_PROPERTIES,
    ConnAck,
    ConnackReturnCodeV3,
    Connect,
    Decoder,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    ProtocolLevel,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    decode_varint,
    encode,
    write_varint,
)

_V5 = ProtocolLevel.MQTT_5
_PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1
_DUP = 0x08
_RETAIN = 0x01
_HEADER = [bytes((i,)) for i in range(256)]
_TOPIC_CACHE = 65536


@dataclass(frozen=True, slots=True)
class Accepted:
    """CONNACK success; ``receive_maximum`` caps the bridge's QoS 1 window."""

    session_present: bool
    receive_maximum: int
    maximum_packet_size: int | None


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """PUBACK for one forwarded message; a ``code`` of 0x80 or more is a refusal."""

    packet_id: int
    code: ReasonCode
    reason: str


@dataclass(frozen=True, slots=True)
class AckedMany:
    """Success PUBACKs (four bytes: no reason code, no properties) for these packet ids, in
    the order they arrived: the hot path, one event per read instead of one per message."""

    packet_ids: list[int]


@dataclass(frozen=True, slots=True)
class Subscribed:
    codes: tuple[ReasonCode, ...]


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the upstream; QoS 1 is acknowledged with :meth:`UpstreamSession.puback`
    once the broker has taken it (in fabric mode: once the stream stored it)."""

    publish: Publish


@dataclass(frozen=True, slots=True)
class ServerClosed:
    code: int
    reason: str


Event = Accepted | ConnectRefused | Acknowledged | AckedMany | Subscribed | Received | ServerClosed

_V3_REFUSALS = {
    ConnackReturnCodeV3.UNACCEPTABLE_PROTOCOL_VERSION: "unacceptable protocol version",
    ConnackReturnCodeV3.IDENTIFIER_REJECTED: "client identifier rejected",
    ConnackReturnCodeV3.SERVER_UNAVAILABLE: "server unavailable",
    ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD: "bad user name or password",
    ConnackReturnCodeV3.NOT_AUTHORIZED: "not authorized",
}


class UpstreamSession:
    """A persistent session (clean start off), so the upstream keeps queueing inbound
    messages while the bridge is away; subscriptions are QoS 1, with no-local on MQTT 5."""

    def __init__(
        self,
        level: ProtocolLevel,
        *,
        client_id: str,
        keep_alive: int,
        session_expiry: int,
        receive_maximum: int,
    ) -> None:
        self.level = level
        self._client_id = client_id
        self._keep_alive = keep_alive
        self._session_expiry = session_expiry
        self._receive_maximum = receive_maximum
        self._decoder = Decoder(protocol_level=level)
        self._rest = b""  # the start of a packet not yet received whole
        self._v5 = level is _V5
        self._topics: dict[str, bytes] = {}  # topic -> its UTF-8 string field

    def connect(self) -> bytes:
        properties = NO_PROPERTIES
        if self.level is _V5:
            properties = Properties(
                session_expiry_interval=self._session_expiry,
                receive_maximum=self._receive_maximum,
            )
        packet = Connect(
            client_id=self._client_id,
            clean_start=False,
            keep_alive=self._keep_alive,
            properties=properties,
        )
        return encode(packet, self.level)

    def subscribe(self, packet_id: int, filters: tuple[str, ...]) -> bytes:
        no_local = self.level is _V5  # our own forwarded messages must not come back
        subscriptions = tuple(
            Subscription(topic_filter=f, qos=QoS.AT_LEAST_ONCE, no_local=no_local) for f in filters
        )
        return encode(Subscribe(packet_id=packet_id, subscriptions=subscriptions), self.level)

    def publish(self, item: Queued) -> bytes:
        """QoS 1 PUBLISH of a queued message; DUP when it was sent before. MQTT 3.1.1 cannot
        carry properties (origin marker included), so they stay behind.

        The hot path: the topic was validated by the broker and the properties are stored
        already encoded, so the packet is put together from bytes (the same bytes
        :func:`broker.mqtt.encode` makes of it; a unit test holds them together)."""
        name = self._topics.get(item.topic)
        if name is None:
            if len(self._topics) >= _TOPIC_CACHE:
                self._topics.clear()
            encoded = item.topic.encode()
            name = self._topics[item.topic] = len(encoded).to_bytes(2, "big") + encoded
        packet_id = (item.seq % 0xFFFF + 1).to_bytes(2, "big")
        payload = item.payload
        first = _PUBLISH_QOS1 | (_DUP if item.sent else 0) | (_RETAIN if item.retain else 0)
        props = item.properties if self._v5 else b""
        length = len(name) + 2 + len(props) + len(payload)
        size = _HEADER[length] if length < 0x80 else write_varint(length)
        return b"".join((_HEADER[first], size, name, packet_id, props, payload))

    def puback(self, packet_id: int) -> bytes:
        return encode(PubAck(packet_id=packet_id), self.level, validate=False)

    def ping(self) -> bytes:
        return encode(PingReq(), self.level)

    def disconnect(self) -> bytes:
        return encode(Disconnect(), self.level)

    def receive(self, data: bytes) -> list[Event]:
        """Events from the upstream's bytes; :class:`ProtocolError` if it broke the protocol.

        Success PUBACKs, nearly everything an upstream sends, are read straight from the bytes
        (one :class:`AckedMany` per call, listed first: the other packets do not depend on
        them); every other packet goes through the codec, whole, one at a time."""
        if self._rest:
            data, self._rest = self._rest + data, b""
        acked: list[int] = []
        events: list[Event] = []
        at, end = 0, len(data)
        while at < end:
            if (
                data[at] == 0x40
                and at + 4 <= end
                and data[at + 1] == 2
                and (packet_id := data[at + 2] << 8 | data[at + 3])
            ):
                acked.append(packet_id)
                at += 4
                continue
            head = decode_varint(data, at + 1, end)  # raises MalformedPacket if malformed
            if head is None or head[1] + head[0] > end:
                self._rest = data[at:]  # the rest of this packet comes in a later read
                break
            length, pos = head
            self._decode(data[at : pos + length], events)
            at = pos + length
        if acked:
            events.insert(0, AckedMany(acked))
        return events

    def _decode(self, data: bytes, events: list[Event]) -> None:
        self._decoder.feed(data)
        while (packet := self._decoder.next_packet()) is not None:
            match packet:
                case ConnAck():
                    events.append(self._connack(packet))
                case PubAck():
                    reason = packet.properties.reason_string or ""
                    events.append(Acknowledged(packet.packet_id, packet.reason_code, reason))
                case SubAck():
                    events.append(Subscribed(packet.reason_codes))
                case Publish() if packet.qos != QoS.EXACTLY_ONCE:
                    events.append(Received(packet))
                case Disconnect():
                    reason = packet.properties.reason_string or ""
                    events.append(ServerClosed(packet.reason_code, reason))
                case PingResp():
                    pass
                case _:
                    raise ProtocolError(
                        ReasonCode.PROTOCOL_ERROR,
                        f"unexpected {type(packet).__name__} from the upstream (the bridge "
                        "subscribes at QoS 1 and never sends QoS 2)",
                    )

    def _connack(self, packet: ConnAck) -> Accepted | ConnectRefused:
        code = int(packet.reason_code)
        if code == 0:
            props = packet.properties
            return Accepted(
                packet.session_present,
                props.receive_maximum or 0xFFFF,
                props.maximum_packet_size,
            )
        if self.level is _V5:
            reason = packet.properties.reason_string or ReasonCode(code).name.lower()
        else:
            reason = _V3_REFUSALS.get(ConnackReturnCodeV3(code), "refused")
        return ConnectRefused(code, reason)
