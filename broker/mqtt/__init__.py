"""Sans-I/O MQTT 3.1.1 and 5.0 protocol layer: bytes in, typed packets out, no sockets.

Shared by the broker, the bridge and the device simulator::

    decoder = Decoder(max_packet_size=64 * 1024)  # server side: learns the level from CONNECT
    decoder.feed(data)
    while (packet := decoder.next_packet()) is not None:
        ...
    sock.sendall(encode(ConnAck(), decoder.protocol_level))
"""

from broker.mqtt._wire import decode_varint, write_varint
from broker.mqtt.codec import MAX_PACKET_SIZE, Decoder, PlainPublish, encode, encode_publish
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
from fleetgate.topics import (
    InvalidTopic,
    SharedSubscription,
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "NO_PROPERTIES",
    "Auth",
    "ConnAck",
    "ConnackReturnCodeV3",
    "Connect",
    "Decoder",
    "Disconnect",
    "InvalidTopic",
    "MalformedPacket",
    "Packet",
    "PacketTooLarge",
    "PacketType",
    "PingReq",
    "PingResp",
    "PlainPublish",
    "Properties",
    "ProtocolError",
    "ProtocolLevel",
    "PubAck",
    "PubComp",
    "PubRec",
    "PubRel",
    "Publish",
    "PublishResponse",
    "QoS",
    "ReasonCode",
    "RetainHandling",
    "SharedSubscription",
    "SubAck",
    "Subscribe",
    "Subscription",
    "UnsubAck",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "decode_varint",
    "encode",
    "encode_publish",
    "parse_shared_subscription",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
    "write_varint",
]
