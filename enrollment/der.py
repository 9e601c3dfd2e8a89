"""The few DER rules fleetgate needs to take a signed structure apart and put it together again
(definite lengths only, as DER has): re-signing with a token key (``signing``) and certificate
templates (``cert_template``)."""

from __future__ import annotations


def _read(der: bytes, at: int) -> tuple[int, int, int]:
    """(content start, content end, element end) of the element at ``at``."""
    length = der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    return start, start + length, start + length


def content(element: bytes) -> bytes:
    """The content octets of the element ``element`` starts with."""
    start, end, _ = _read(element, 0)
    return element[start:end]


def children(element: bytes) -> list[bytes]:
    """The complete elements (tag, length, content) inside a constructed element."""
    start, end, _ = _read(element, 0)
    found = []
    at = start
    while at < end:
        _, _, stop = _read(element, at)
        found.append(element[at:stop])
        at = stop
    return found


def tlv(tag: int, value: bytes) -> bytes:
    """One element: ``tag``, the DER length of ``value``, ``value``."""
    size = len(value)
    if size < 0x80:
        return bytes([tag, size]) + value
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(encoded)]) + encoded + value
