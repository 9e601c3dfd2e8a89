"""Shared subscriptions in the embedded broker (issue 12): ``$share/<group>/<filter>`` with real
paho clients (MQTT 5 and 3.1.1) and a raw client where a member must withhold its PUBACKs.

Each message reaches one member of a group, every group once, an ordinary subscriber still
everything; a member whose session ends hands its unacknowledged QoS 1 messages on; retained
messages are not sent on a shared subscription; malformed share names and No Local on a shared
subscription are refused and audited; the ACL and the limits judge the inner filter.
"""

from __future__ import annotations

import queue
from collections import Counter

import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Creds,
    Paho,
    RawClient,
    RunningBroker,
    enroll,
    running_broker,  # noqa: F401
    wait_for,
)

from broker.acl import DEFAULT_TEMPLATE
from broker.mqtt import (
    Disconnect,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
)
from broker.routing import SubscriptionOptions
from broker.session import Session
from broker.shared import ShareGroup, queue_name, share_key

BOTH = pytest.mark.parametrize("version", [V311, V5], ids=["3.1.1", "5.0"])
JOBS = "$share/workers/jobs/#"


@pytest.fixture
def workers(fleet) -> list[Creds]:
    """Four devices of group ``workers``, which may publish and subscribe under ``jobs/``."""
    fleet.registry.set_acl("workers", publish=["jobs/#"], subscribe=["jobs/#"], actor="test")
    return [enroll(fleet, f"worker-{n}", group="workers") for n in range(1, 5)]


def connected(broker: RunningBroker, creds: Creds, **kwargs: object) -> Paho:
    client = Paho(broker, creds, **kwargs)  # type: ignore[arg-type]
    assert client.connect()[0] == 0
    return client


def drain(client: Paho, within: float = 0.5) -> list[bytes]:
    """Every payload ``client`` receives until it has been quiet for ``within`` seconds."""
    got = []
    while True:
        try:
            got.append(client.message(within).payload)
        except queue.Empty:
            return got


def payloads(count: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}-{n}".encode() for n in range(count)]


@BOTH
def test_each_message_reaches_one_member_each_group_once_and_plain_subscribers_all(
    broker, workers, version
):
    w1, w2, w3, w4 = (connected(broker, c, version=version) for c in workers)
    try:
        for member in (w1, w2):
            assert member.subscribe(JOBS, 1) == [1]
        assert w3.subscribe("$share/audit/jobs/+", 1) == [1]  # another group, another filter
        assert w4.subscribe("jobs/#", 1) == [1]  # an ordinary subscriber
        sent = payloads(40)
        for payload in sent:
            assert w4.publish("jobs/a", payload, qos=1) == 0
        assert sorted(drain(w4)) == sorted(sent)
        first, second = drain(w1), drain(w2)
        assert Counter(first + second) == Counter(sent)  # every message, once
        assert abs(len(first) - len(second)) <= 2  # round-robin while both keep up
        assert Counter(drain(w3)) == Counter(sent)  # a group of one gets everything
    finally:
        for client in (w1, w2, w3, w4):
            client.close()


@BOTH
def test_a_member_leaving_mid_stream_hands_its_unacknowledged_qos1_messages_on(
    broker, workers, version
):
    """worker-1 (raw) takes its share and never acknowledges, then its connection dies
    (clean session): what it held reaches worker-2, each message once."""
    raw = RawClient(broker, workers[0], level=version)
    stayer = connected(broker, workers[1], version=version)
    publisher = connected(broker, workers[2], version=version)
    try:
        raw.connect(client_id="worker-1", clean_start=True, keep_alive=60)
        raw.send(
            Subscribe(
                packet_id=1, subscriptions=(Subscription(topic_filter=JOBS, qos=QoS.AT_LEAST_ONCE),)
            )
        )
        assert isinstance(raw.receive(), SubAck)
        assert stayer.subscribe(JOBS, 1) == [1]
        sent = payloads(40)
        for payload in sent[:20]:
            assert publisher.publish("jobs/x", payload, qos=1) == 0
        held = []
        while len(held) < 10:  # round-robin: half of the first twenty
            packet = raw.receive()
            assert isinstance(packet, Publish)
            held.append(packet.payload)
        raw.close()  # gone without DISCONNECT, nothing acknowledged
        for payload in sent[20:]:
            assert publisher.publish("jobs/x", payload, qos=1) == 0
        got = drain(stayer, within=1.0)
        assert Counter(got) == Counter(sent)
        assert set(held) <= set(got)
    finally:
        raw.close()
        stayer.close()
        publisher.close()


def test_acknowledged_messages_are_not_handed_on(broker, workers):
    raw = RawClient(broker, workers[0])
    stayer = connected(broker, workers[1])
    try:
        raw.connect(client_id="worker-1", clean_start=True)
        raw.send(
            Subscribe(
                packet_id=1, subscriptions=(Subscription(topic_filter=JOBS, qos=QoS.AT_LEAST_ONCE),)
            )
        )
        assert isinstance(raw.receive(), SubAck)
        assert stayer.subscribe(JOBS, 1) == [1]
        for payload in payloads(10):
            assert stayer.publish("jobs/y", payload, qos=1) == 0
        acked = 0
        while acked < 5:
            packet = raw.receive()
            assert isinstance(packet, Publish) and packet.packet_id is not None
            raw.send(PubAck(packet_id=packet.packet_id))
            acked += 1
        raw.send(Disconnect())
        assert raw.receive() is None
        assert len(drain(stayer)) == 5  # its own share; nothing of worker-1's again
    finally:
        raw.close()
        stayer.close()


@BOTH
def test_retained_messages_are_not_sent_on_a_shared_subscription(broker, workers, version):
    member, plain = (connected(broker, c, version=version) for c in workers[:2])
    try:
        assert plain.publish("jobs/retained", b"kept", qos=1, retain=True) == 0
        assert member.subscribe(JOBS, 1) == [1]
        member.no_message()
        assert plain.subscribe("jobs/#", 1) == [1]
        assert plain.message().payload == b"kept"
    finally:
        member.close()
        plain.close()


def test_unsubscribing_a_shared_subscription_leaves_the_group(broker, workers):
    leaver, stayer = (connected(broker, c) for c in workers[:2])
    try:
        for member in (leaver, stayer):
            assert member.subscribe(JOBS, 1) == [1]
        leaver.client.unsubscribe(JOBS)
        wait_for(
            lambda: broker.call(lambda: len(broker.broker.core.shared.groups[JOBS[7:]].order) == 1)
        )
        for payload in payloads(6):
            assert leaver.publish("jobs/z", payload, qos=1) == 0
        assert len(drain(stayer)) == 6
        leaver.no_message()
    finally:
        leaver.close()
        stayer.close()


def test_the_acl_and_the_limits_judge_the_inner_filter(broker, workers):
    client = connected(broker, workers[0])
    try:
        refused = ReasonCode.NOT_AUTHORIZED.value
        assert client.subscribe("$share/workers/devices/#", 1) == [refused]
        assert client.subscribe("$share/jobs/jobs/#", 1) == [1]  # a share name is no topic
        too_deep = "$share/g/jobs/" + "/".join("l" * 20)
        assert client.subscribe(too_deep, 1) == [ReasonCode.QUOTA_EXCEEDED.value]
        events = wait_for(
            lambda: broker.audit_events("worker-1", outcome="refused") or None,
            what="the refusals audited",
        )
        assert any("devices/#" in e.reason for e in events)
    finally:
        client.close()


def raw_subscribe(topic_filter: bytes, options: int, level: int) -> bytes:
    """A SUBSCRIBE built by hand: the codec refuses to encode these."""
    body = b"\x00\x07" + (b"\x00" if level == 5 else b"")
    body += len(topic_filter).to_bytes(2, "big") + topic_filter + bytes([options])
    assert len(body) < 128
    return bytes([0x82, len(body)]) + body


@pytest.mark.parametrize(
    ("topic_filter", "options", "code", "said"),
    [
        (b"$share/+/jobs/#", 1, ReasonCode.TOPIC_FILTER_INVALID, "share name"),
        (b"$share/g#/jobs", 1, ReasonCode.TOPIC_FILTER_INVALID, "g#"),
        (b"$share//jobs", 1, ReasonCode.TOPIC_FILTER_INVALID, "share name"),
        (b"$share/workers", 1, ReasonCode.TOPIC_FILTER_INVALID, "no topic filter"),
        (b"$share/workers/jobs/#", 1 | 4, ReasonCode.PROTOCOL_ERROR, "no-local"),
    ],
)
def test_malformed_shared_subscriptions_are_refused_and_audited(
    broker, workers, topic_filter, options, code, said
):
    raw = RawClient(broker, workers[0])
    try:
        raw.connect(client_id="worker-1")
        raw.sock.sendall(raw_subscribe(topic_filter, options, 5))
        closing = raw.receive()
        assert isinstance(closing, Disconnect) and closing.reason_code == code
    finally:
        raw.close()
    events = wait_for(
        lambda: broker.audit_events("worker-1", action="mqtt.protocol") or None,
        what="the refusal audited",
    )
    assert said in events[0].reason


def test_a_311_client_sending_a_malformed_share_name_is_disconnected(broker, workers):
    raw = RawClient(broker, workers[0], level=V311)
    try:
        raw.connect(client_id="worker-1")
        raw.sock.sendall(raw_subscribe(b"$share/+/jobs", 1, V311))
        assert raw.receive() is None  # 3.1.1 has no server DISCONNECT: closed
    finally:
        raw.close()


# -- the pure pieces -------------------------------------------------------------------------


class _Conn:
    writable = True


def _sessions(*names: str) -> dict[str, Session]:
    sessions = {name: Session(name, name) for name in names}
    for session in sessions.values():
        session.connection = _Conn()  # type: ignore[assignment]
    return sessions


def test_the_pick_goes_round_the_ready_members_and_skips_a_backlog() -> None:
    sessions = _sessions("a", "b", "c")
    group = ShareGroup("g/t")
    for name in sessions:
        group.members[name] = SubscriptionOptions(QoS.AT_LEAST_ONCE)
        group.order.append(name)
    picks = [group.choose(sessions, QoS.AT_LEAST_ONCE) for _ in range(6)]
    assert [s.client_id for s in picks if s] == ["a", "b", "c", "a", "b", "c"]
    sessions["b"].queue.append(None)  # type: ignore[arg-type]  # b's window is full
    picks = [group.choose(sessions, QoS.AT_LEAST_ONCE) for _ in range(4)]
    assert [s.client_id for s in picks if s] == ["a", "c", "a", "c"]
    for name in ("a", "c"):
        sessions[name].queue.extend([None, None])  # type: ignore[list-item]
    assert (picked := group.choose(sessions, QoS.AT_LEAST_ONCE)) is not None
    assert picked.client_id == "b"  # nobody ready: the least loaded
    for session in sessions.values():
        session.connection = None
    assert group.choose(sessions, QoS.AT_MOST_ONCE) is None  # nobody to take QoS 0
    assert group.choose(sessions, QoS.AT_LEAST_ONCE) is None  # no persistent session either
    sessions["c"].expiry_interval = 60
    assert (picked := group.choose(sessions, QoS.AT_LEAST_ONCE)) is not None
    assert picked.client_id == "c"


def test_the_acl_judges_a_shared_subscription_by_its_filter() -> None:
    acl = DEFAULT_TEMPLATE.for_device("d1")
    assert acl.may_subscribe("$share/g/devices/d1/commands/#")  # kept on a policy change
    assert not acl.may_subscribe("$share/g/devices/d2/commands/#")


def test_keys_and_queue_names() -> None:
    assert share_key("$share/g/a/#") == "g/a/#"
    assert share_key("a/#") is None
    assert queue_name("g/a/#") != queue_name("g/a/+")
    assert " " not in queue_name("a group/a")
