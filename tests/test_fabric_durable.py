"""The bookkeeping of messages stored in JetStream before their acknowledgement, without I/O."""

from __future__ import annotations

import json

from broker.fabric.durable import DurableLedger


def _ledger() -> DurableLedger:
    return DurableLedger("gate-1", "e1", ack_timeout_s=2.0, give_up_s=30.0)


def test_each_message_gets_its_reply_subject_and_a_stable_msg_id() -> None:
    ledger = _ledger()
    first = ledger.add("devices.d1.t", b"a", {"Nmqtt-Pub": "1"}, lambda ok, now: None, 0.0)
    second = ledger.add("devices.d1.t", b"b", None, lambda ok, now: None, 0.0)
    assert ledger.reply_subject(first) == "$FG.acks.gate-1.1"
    item = ledger.pending[first]
    assert item.subject == "$FG.q.devices.d1.t"
    assert item.headers == {"Nmqtt-Pub": "1", "Nats-Msg-Id": "gate-1.e1.1"}
    assert ledger.pending[second].headers == {"Nats-Msg-Id": "gate-1.e1.2"}


def test_only_a_stored_answer_for_a_pending_message_counts() -> None:
    ledger = _ledger()
    number = ledger.add("s", b"", None, lambda ok, now: None, 0.0)
    stored = json.dumps({"stream": "FG_MSGS", "seq": 7}).encode()
    reply = ledger.reply_subject(number)
    assert ledger.answered(reply, stored, None) == number
    assert ledger.answered(reply, stored, "503") is None  # no responders: no leader
    error = json.dumps({"error": {"code": 503, "description": "unavailable"}}).encode()
    assert ledger.answered(reply, error, None) is None
    assert ledger.answered(reply, b"not json", None) is None
    assert ledger.answered("$FG.acks.gate-1.99", stored, None) is None  # not pending
    assert ledger.answered("$FG.acks.gate-1.x", stored, None) is None


def test_overdue_messages_are_resent_and_hopeless_ones_given_up() -> None:
    ledger = _ledger()
    old = ledger.add("s", b"", None, lambda ok, now: None, 0.0)
    new = ledger.add("s", b"", None, lambda ok, now: None, 20.0)
    queued = ledger.add("s", b"", None, lambda ok, now: None, 20.0)
    ledger.pending[old].last_sent = 20.0
    ledger.pending[new].last_sent = 20.0
    assert ledger.due(21.0) == ([], [])
    assert ledger.due(22.5) == ([old], [])  # the oldest first, alone; queued was never sent
    assert ledger.holding and ledger.pending[new].last_sent is None  # held behind it
    ledger.pending[old].last_sent = 22.5
    assert ledger.due(30.0) == ([new], [old])  # given up, not resent: the next oldest goes
    del ledger.pending[old]
    assert queued in ledger.pending


def _sent(ledger: DurableLedger, numbers: list[int], now: float) -> None:
    for number in numbers:
        ledger.pending[number].last_sent = now


def test_a_resend_is_never_overtaken_by_later_messages() -> None:
    """x0 went out a tick before x1..x9 during a leader election: x0 alone is sent again, and
    x1..x9 (and x10, new) only once it is stored, in order (MQTT 5 §4.6; issue 12: x0 came
    back stored after x1..x9 when each was resent at its own timeout)."""
    ledger = _ledger()
    numbers = [
        ledger.add("s", f"x{i}".encode(), None, lambda ok, now: None, 0.0) for i in range(10)
    ]
    _sent(ledger, numbers[:1], 0.0)
    _sent(ledger, numbers[1:], 0.1)
    assert not ledger.holding
    assert ledger.due(2.0) == ([numbers[0]], [])  # overdue: only it, not x1..x9 a tick later
    assert ledger.holding and all(ledger.pending[n].last_sent is None for n in numbers[1:])
    _sent(ledger, numbers[:1], 2.0)
    assert ledger.due(2.1) == ([], [])  # x1..x9's own timeouts: nothing overtakes x0
    new = ledger.add("s", b"x10", None, lambda ok, now: None, 2.2)
    assert ledger.due(4.0) == ([numbers[0]], [])  # x0 again, still alone
    _sent(ledger, numbers[:1], 4.0)
    late = numbers[5]  # an answer for a copy sent before the hold: not the end of it
    del ledger.pending[late]
    assert ledger.release() == []
    del ledger.pending[numbers[0]]  # x0 stored
    assert ledger.release() == [n for n in numbers[1:] if n != late] + [new]
    assert not ledger.holding
    assert ledger.due(4.1) == ([], [])


def test_a_hold_ends_when_nothing_waits() -> None:
    ledger = _ledger()
    number = ledger.add("s", b"", None, lambda ok, now: None, 0.0)
    _sent(ledger, [number], 0.0)
    assert ledger.due(2.0) == ([number], [])
    assert ledger.due(31.0) == ([], [number])  # given up
    del ledger.pending[number]
    assert ledger.due(31.25) == ([], []) and not ledger.holding


def test_the_wire_form_of_an_answer_is_read_without_json() -> None:
    """nats-server's compact answers take the fast path; anything else is parsed."""
    from broker.fabric.durable import stored

    assert stored(b'{"stream":"FG_MSGS","seq":12}')
    assert stored(b'{"stream":"FG_MSGS","seq":12,"duplicate":true}')
    assert stored(b'{"stream":"FG_MSGS","domain":"x","seq":3}')
    assert not stored(b'{"stream":"FG_MSGS","error":{"code":503},"seq":1}')
    assert not stored(b'{"error":{"code":503,"description":"unavailable"}}')
    assert not stored(b'{"stream":"FG_MSGS"}')
    assert not stored(b"")
