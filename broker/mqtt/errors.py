"""Errors raised when the peer's bytes break the protocol.

Each carries the MQTT 5 reason code the server should put in its CONNACK or DISCONNECT (MQTT 5)
before closing; on 3.1.1 the connection is simply closed. After any of these the decoder's
stream is unusable, as after h11's ``RemoteProtocolError``.
"""

from __future__ import annotations

from broker.mqtt.packets import ReasonCode


class ProtocolError(Exception):
    """The peer sent something the specification forbids."""

    def __init__(self, reason_code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


class MalformedPacket(ProtocolError):
    """The bytes cannot be parsed as the packet they claim to be (spec section 4.13)."""


class PacketTooLarge(ProtocolError):
    """Raised from the fixed header alone, so an oversized body is never buffered."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            ReasonCode.PACKET_TOO_LARGE, f"packet of {size} bytes exceeds the limit of {limit}"
        )
        self.size = size
        self.limit = limit


class UnsupportedProtocolVersion(ProtocolError):
    """CONNECT for a protocol other than MQTT 3.1.1 or 5.0.

    The server answers with CONNACK return code 1 (3.1.1, also understood by 3.1 clients) or
    reason code 0x84 (MQTT 5), chosen by ``level``, and then closes the connection.
    """

    def __init__(self, level: int, protocol_name: str) -> None:
        super().__init__(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"unsupported protocol {protocol_name!r} level {level}",
        )
        self.level = level
        self.protocol_name = protocol_name
