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
    ledger.pending[old].last_sent = 28.0
    ledger.pending[new].last_sent = 20.0
    assert ledger.due(21.0) == ([], [])
    assert ledger.due(22.5) == ([new], [])  # queued was never sent: not overdue
    assert ledger.due(30.0) == ([new], [old])  # given up, not resent
    assert queued in ledger.pending


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
