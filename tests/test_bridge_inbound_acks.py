"""The order of a bridge's PUBACKs upstream (:class:`broker.bridge.link.InboundAcks`, no I/O):
a QoS 1 message from the upstream is acknowledged once its owner has taken it (in fabric mode,
once FG_MSGS stored it), in the order the messages came; one not taken ends the connection."""

from __future__ import annotations

from broker.bridge.link import InboundAcks


def puback(packet_id: int) -> bytes:
    return bytes((0x40, 2)) + packet_id.to_bytes(2, "big")


def test_acknowledgements_go_in_arrival_order_once_each_message_is_taken() -> None:
    acks = InboundAcks(puback)
    first, second, third = acks.expect(7), acks.expect(8), acks.expect(9)
    second(True)  # stored before the first one: waits for it
    assert acks.take() == b"" and acks.ready.is_set()
    acks.ready.clear()
    first(True)
    assert acks.take() == puback(7) + puback(8)
    third(True)
    assert acks.take() == puback(9) and not acks.failed


def test_settled_during_a_read_the_reader_writes_them_itself() -> None:
    acks = InboundAcks(puback)
    acks.reading = True
    acks.expect(1)(True)
    assert not acks.ready.is_set() and acks.take() == puback(1)


def test_a_message_not_taken_fails_the_connection_and_later_answers_do_nothing() -> None:
    acks = InboundAcks(puback)
    first, second = acks.expect(1), acks.expect(2)
    first(False)  # the fabric did not store it: the upstream must send it again
    assert acks.failed and acks.ready.is_set()
    second(True)
    assert acks.take() == b""  # nothing after it either: PUBACKs go in order
    acks.closed = True  # the connection ended
    acks.ready.clear()
    late = acks.expect(3)
    late(True)
    assert acks.take() == b"" and not acks.ready.is_set()
