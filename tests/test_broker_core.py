"""The sans-I/O core on its own: packets in, packets out, on a clock the test turns.

What takes seconds of real time over sockets (will delays, session expiry, the keep-alive
boundary) is exact here, and the topic tries are checked against the spec's matching rules.
"""

from __future__ import annotations

import pytest

from broker.acl import DEFAULT_TEMPLATE, AclTemplate
from broker.admission import Admitted, Identity, Refused, Unidentified
from broker.connection import AdmissionRequest, Connection
from broker.core import BrokerCore, CoreSettings
from broker.metrics import Metrics
from broker.mqtt import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    Publish,
    QoS,
    ReasonCode,
    Subscribe,
    Subscription,
    Will,
    encode,
)
from broker.routing import Message, RetainedMessages, SubscriptionOptions, SubscriptionTree
from enrollment.registry import AuditRecord, DeviceState

V5 = 5
OPEN = AclTemplate(publish=("devices/%d/#", "shared/#"), subscribe=("shared/#", "devices/%d/#"))


class Client:
    """One connection driven by hand: bytes from :func:`encode`, answers through a Decoder."""

    def __init__(self, core: BrokerCore, device_id: str, now: float = 0.0, level: int = V5):
        self.core = core
        self.level = level
        self.conn = Connection(
            core, peer="test", identity=Identity(device_id, 1), listener="tls", now=now
        )
        self.decoder = Decoder(protocol_level=level)

    def send(self, packet: Packet, now: float = 0.0) -> AdmissionRequest | None:
        return self.conn.receive_data(encode(packet, self.level), now)

    def received(self) -> list[Packet]:
        self.decoder.feed(self.conn.take_output())
        packets = []
        while (packet := self.decoder.next_packet()) is not None:
            packets.append(packet)
        return packets

    def connect(self, now: float = 0.0, **fields: object) -> ConnAck:
        request = self.send(Connect(**fields), now)  # type: ignore[arg-type]
        assert isinstance(request, AdmissionRequest)
        device = request.identity.device_id
        self.conn.admission_done(Admitted("default", OPEN.for_device(device)), now)
        (connack,) = self.received()
        assert isinstance(connack, ConnAck)
        return connack


@pytest.fixture
def audit() -> list[AuditRecord]:
    return []


@pytest.fixture
def core(audit: list[AuditRecord]) -> BrokerCore:
    return BrokerCore(CoreSettings(), metrics=Metrics(), audit=audit.append)


def watch(core: BrokerCore) -> Client:
    watcher = Client(core, "watcher")
    watcher.connect(keep_alive=0)
    watcher.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="shared/#"),)))
    watcher.received()
    return watcher


def will(delay: int | None = None) -> Will:
    return Will(
        topic="shared/wills", payload=b"gone", properties=Properties(will_delay_interval=delay)
    )


# -- wills and session expiry ----------------------------------------------------------------------


def test_will_waits_for_its_delay_then_is_published(core):
    watcher = watch(core)
    device = Client(core, "d1")
    device.connect(will=will(delay=10), properties=Properties(session_expiry_interval=60))
    device.conn.connection_lost(now=100.0)
    core.tick(109.9)
    assert watcher.received() == []
    core.tick(110.0)
    (message,) = watcher.received()
    assert isinstance(message, Publish) and message.payload == b"gone"


def test_reconnecting_within_the_will_delay_cancels_the_will(core):
    watcher = watch(core)
    device = Client(core, "d1")
    device.connect(will=will(delay=10), properties=Properties(session_expiry_interval=60))
    device.conn.connection_lost(now=100.0)
    again = Client(core, "d1", now=105.0)
    assert again.connect(105.0, clean_start=False).session_present
    core.tick(200.0)
    assert watcher.received() == []


def test_session_ending_before_the_will_delay_publishes_the_will_then(core):
    watcher = watch(core)
    device = Client(core, "d1")
    device.connect(will=will(delay=100), properties=Properties(session_expiry_interval=5))
    device.conn.connection_lost(now=0.0)
    core.tick(5.0)
    assert len(watcher.received()) == 1
    assert "d1" not in core.sessions


def test_session_expires_after_its_interval(core):
    device = Client(core, "d1")
    device.connect(properties=Properties(session_expiry_interval=30))
    device.send(Disconnect())
    core.tick(29.0)
    assert "d1" in core.sessions
    core.tick(30.0)
    assert "d1" not in core.sessions


def test_disconnect_may_not_set_an_expiry_after_connect_said_0(core):
    device = Client(core, "d1")
    device.connect()
    device.send(Disconnect(properties=Properties(session_expiry_interval=10)))
    (goodbye,) = device.received()
    assert goodbye == Disconnect(
        reason_code=ReasonCode.PROTOCOL_ERROR,
        properties=Properties(reason_string="session expiry set on DISCONNECT after 0 on CONNECT"),
    )


# -- keep-alive and CONNECT timeout ----------------------------------------------------------------


def test_keep_alive_allows_one_and_a_half_intervals_of_silence(core):
    device = Client(core, "d1")
    device.connect(keep_alive=10)
    device.send(PingReq(), now=1.0)
    assert device.received() == [PingResp()]
    core.tick(16.0)
    assert device.received() == []
    core.tick(16.01)
    (goodbye,) = device.received()
    assert isinstance(goodbye, Disconnect)
    assert goodbye.reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    assert device.conn.closing


def test_connection_that_never_sends_connect_is_closed(core):
    device = Client(core, "d1")
    core.tick(10.5)
    assert device.conn.closing
    assert device.received() == []


# -- refusals, without sockets ---------------------------------------------------------------------


def test_unidentified_certificate_gets_connack_not_authorized_and_an_audit(core, audit):
    conn = Connection(
        core, peer="1.2.3.4:5", identity=Unidentified("no URI SAN"), listener="tls", now=0.0
    )
    assert conn.receive_data(encode(Connect(client_id="x"), 4), 0.0) is None
    assert conn.take_output() == bytes([0x20, 2, 0, 5])  # CONNACK, return code 5
    assert conn.closing
    assert audit == [AuditRecord("peer:1.2.3.4:5", "mqtt.connect", "refused", None, "no URI SAN")]


def test_registry_refusal_maps_to_connack_code_of_the_version(core):
    for level, expected in ((4, bytes([0x20, 2, 0, 5])), (5, None)):
        device = Client(core, "d1", level=level)
        device.send(Connect(client_id="d1"))
        device.conn.admission_done(Refused("device d1 is revoked"), 0.0)
        if expected is not None:
            assert device.conn.take_output() == expected
        else:
            (connack,) = device.received()
            assert connack == ConnAck(
                reason_code=ReasonCode.NOT_AUTHORIZED,
                properties=Properties(reason_string="device d1 is revoked"),
            )


def test_unsupported_protocol_level_gets_connack_1_then_close(core):
    conn = Connection(core, peer="p", identity=Identity("d1", 1), listener="tls", now=0.0)
    mqtt31 = bytes.fromhex("101000064d514973647003020000000264 31".replace(" ", ""))
    conn.receive_data(mqtt31, 0.0)
    assert conn.take_output() == bytes([0x20, 2, 0, 1])
    assert conn.closing


def test_kick_sends_administrative_action_to_a_v5_client_and_skips_the_will(core):
    watcher = watch(core)
    device = Client(core, "d1")
    device.connect(will=will())
    assert core.kick("d1", DeviceState.REVOKED, "keyCompromise", 1.0) == 1
    (goodbye,) = device.received()
    assert isinstance(goodbye, Disconnect)
    assert goodbye.reason_code == ReasonCode.ADMINISTRATIVE_ACTION
    assert watcher.received() == []
    assert "d1" not in core.sessions
    assert core.metrics.kicks["revoked"] == 1


# -- the topic tries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("sport/tennis/player1", {"sport/#", "sport/tennis/+", "+/tennis/#", "#"}),
        ("sport", {"sport/#", "#"}),
        ("sport/", {"sport/#", "sport/+", "#", "+/+"}),
        ("$SYS/uptime", {"$SYS/#"}),
        ("/finance", {"+/+", "#", "/+"}),
    ],
)
def test_subscription_tree_matches_as_mqtt_4_7_says(topic, expected):
    tree = SubscriptionTree()
    filters = ["sport/#", "sport/tennis/+", "+/tennis/#", "#", "sport/+", "$SYS/#", "+/+", "/+"]
    for topic_filter in filters:
        tree.add(topic_filter, topic_filter, SubscriptionOptions(qos=QoS.AT_MOST_ONCE))
    assert {client for client, _ in tree.match(topic)} == expected


def test_subscription_tree_prunes_what_it_no_longer_needs():
    tree = SubscriptionTree()
    options = SubscriptionOptions(qos=QoS.AT_MOST_ONCE)
    assert tree.add("a/b/c", "x", options) is True
    assert tree.add("a/b/c", "x", options) is False
    assert tree.remove("a/b/c", "x") is True
    assert tree.remove("a/b/c", "x") is False
    assert tree._root.children == {}


def test_retained_messages_match_filters_and_empty_payload_deletes():
    store = RetainedMessages()
    for topic in ("a/b", "a/c/d", "$SYS/x", "a"):
        store.store(Message(topic, b"1", QoS.AT_MOST_ONCE, True, Properties(), "s"))
    assert {m.topic for m in store.matching("a/#")} == {"a", "a/b", "a/c/d"}
    assert {m.topic for m in store.matching("+/b")} == {"a/b"}
    assert {m.topic for m in store.matching("#")} == {"a", "a/b", "a/c/d"}
    assert {m.topic for m in store.matching("$SYS/+")} == {"$SYS/x"}
    store.store(Message("a/b", b"", QoS.AT_MOST_ONCE, True, Properties(), "s"))
    assert {m.topic for m in store.matching("a/#")} == {"a", "a/c/d"}
    assert store.count == 3


def test_default_acl_denies_reserved_topics():
    acl = DEFAULT_TEMPLATE.for_device("d1")
    assert acl.may_publish("devices/d1/telemetry")
    assert not acl.may_publish("$SYS/devices/d1")
    wide = AclTemplate(publish=("#",), subscribe=("#",)).for_device("d1")
    assert not wide.may_subscribe("$SYS/#")
    assert wide.may_subscribe("#")
