"""MQTT's primitive data types (spec section 1.5), read with bounds checks and written with range
checks.

Reading raises :class:`MalformedPacket` and nothing else, so that arbitrary input can only ever
produce the codec's own errors; writing raises :class:`ValueError`, because a bad value to
encode is the local program's bug, not the peer's.
"""

from __future__ import annotations

from broker.mqtt.errors import MalformedPacket
from broker.mqtt.packets import ReasonCode

MAX_VARINT = 268_435_455
MAX_UINT16 = 0xFFFF
MAX_UINT32 = 0xFFFF_FFFF


def malformed(message: str) -> MalformedPacket:
    return MalformedPacket(ReasonCode.MALFORMED_PACKET, message)


def decode_varint(data: bytes | bytearray, start: int, end: int) -> tuple[int, int] | None:
    """Return ``(value, offset after it)``, or ``None`` if the integer runs past ``end``."""
    value = 0
    for index in range(4):
        if start + index >= end:
            return None
        digit = data[start + index]
        value |= (digit & 0x7F) << (7 * index)
        if not digit & 0x80:
            if digit == 0 and index > 0:
                raise malformed("variable byte integer is not minimally encoded")
            return value, start + index + 1
    raise malformed("variable byte integer is longer than four bytes")


class Reader:
    """A cursor over one packet's body."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, count: int) -> bytes:
        start = self._pos
        end = start + count
        if end > self._end:
            raise malformed("packet ends inside a field")
        self._pos = end
        return self._data[start:end]

    def rest(self) -> bytes:
        return self.take(self.remaining)

    def sub(self, count: int) -> Reader:
        """Split off the next ``count`` bytes, e.g. a property block with its own length."""
        if count > self.remaining:
            raise malformed("length field runs past the end of the packet")
        reader = Reader(self._data, self._pos, self._pos + count)
        self._pos += count
        return reader

    def finish(self) -> None:
        if self.remaining:
            raise malformed(f"{self.remaining} byte(s) left over after the last field")

    def byte(self) -> int:
        pos = self._pos
        if pos >= self._end:
            raise malformed("packet ends inside a field")
        self._pos = pos + 1
        return self._data[pos]

    def uint16(self) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise malformed("packet ends inside a field")
        self._pos = pos + 2
        return self._data[pos] << 8 | self._data[pos + 1]

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        decoded = decode_varint(self._data, self._pos, self._end)
        if decoded is None:
            raise malformed("packet ends inside a variable byte integer")
        value, self._pos = decoded
        return value

    def binary(self) -> bytes:
        return self.take(self.uint16())

    def utf8(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise malformed(f"string is not valid UTF-8: {exc.reason}") from None
        if "\x00" in text:
            raise malformed("string contains U+0000")
        return text


def write_varint(value: int) -> bytes:
    """The MQTT variable byte integer: the one encoder (packets, properties, the bridge)."""
    if 0 <= value < 0x4000:  # one or two bytes: nearly every remaining length
        return bytes((value,)) if value < 0x80 else bytes((value & 0x7F | 0x80, value >> 7))
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def write_uint16(value: int) -> bytes:
    if not 0 <= value <= MAX_UINT16:
        raise ValueError(f"{value} does not fit a two byte integer")
    return value.to_bytes(2, "big")


def write_uint32(value: int) -> bytes:
    if not 0 <= value <= MAX_UINT32:
        raise ValueError(f"{value} does not fit a four byte integer")
    return value.to_bytes(4, "big")


def write_binary(data: bytes) -> bytes:
    if len(data) > MAX_UINT16:
        raise ValueError(f"{len(data)} bytes is longer than a length-prefixed field allows")
    return write_uint16(len(data)) + data


def write_utf8(text: str) -> bytes:
    if "\x00" in text:
        raise ValueError("MQTT strings must not contain U+0000")
    return write_binary(text.encode("utf-8"))
