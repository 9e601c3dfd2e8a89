"""The bridge's pure parts on their own: topic rules, configuration, the queue's bounds and
order, the SQLite store, the upstream session's bytes, and the connection's held PUBACKs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.acl import AclTemplate
from broker.admission import Admitted, Identity
from broker.bridge.plan import plan_bridge
from broker.bridge.protocol import (
    Accepted,
    AckedMany,
    Acknowledged,
    ConnectRefused,
    Received,
    UpstreamSession,
)
from broker.bridge.queue import OutQueue, Queued
from broker.bridge.store import Acked, NewMessage, QueueStore
from broker.bridge.topics import (
    InvalidBridgeRule,
    compile_rule,
    first_remap,
    remap,
)
from broker.connection import AdmissionRequest, Connection
from broker.core import BrokerCore, CoreSettings, GateVerdict
from broker.metrics import Metrics
from broker.mqtt import (
    NO_PROPERTIES,
    ConnAck,
    Connect,
    Decoder,
    Packet,
    Properties,
    ProtocolError,
    ProtocolLevel,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    Subscribe,
    encode,
)
from broker.mqtt.properties import encode_properties
from broker.mqtt.topics import filters_overlap
from broker.routing import Message
from enrollment.config import CONFIG_FILE, load_config
from enrollment.errors import ConfigError

V5, V3 = ProtocolLevel.MQTT_5, ProtocolLevel.MQTT_3_1_1

# -- topic rules ----------------------------------------------------------------------------------


def rule(source: str, target: str, site: str = "plant-7"):
    return compile_rule(source, target, site=site, where="test")


@pytest.mark.parametrize(
    ("source", "target", "topic", "expected"),
    [
        (
            "devices/+/telemetry",
            "sites/{site}/devices/+/telemetry",
            "devices/d1/telemetry",
            "sites/plant-7/devices/d1/telemetry",
        ),
        (
            "sites/{site}/commands/+",
            "devices/+/commands",
            "sites/plant-7/commands/d9",
            "devices/d9/commands",
        ),
        ("devices/+/telemetry", "x/+", "devices/d1/status", None),
        ("devices/+/telemetry", "x/+", "devices/d1/telemetry/extra", None),
        ("a/+/b/+", "z/+/+", "a/1/b/2", "z/1/2"),
        ("devices/#", "up/#", "devices/d1/a/b", "up/d1/a/b"),
        ("devices/#", "up/#", "devices", "up"),  # '#' matches the parent level too
        ("+/x", "y/+", "$SYS/x", None),  # leading wildcards never match $ topics
        ("fixed/topic", "other/topic", "fixed/topic", "other/topic"),
    ],
)
def test_a_rule_renames_matching_topics_and_carries_wildcard_levels_across(
    source, target, topic, expected
):
    assert remap(rule(source, target), topic) == expected


def test_the_first_matching_rule_wins_so_each_message_crosses_once():
    rules = [rule("devices/+/telemetry", "a/+"), rule("devices/#", "b/#")]
    assert first_remap(rules, "devices/d1/telemetry") == "a/d1"
    assert first_remap(rules, "devices/d1/status") == "b/d1/status"
    assert first_remap(rules, "other") is None


@pytest.mark.parametrize(
    ("source", "target", "site", "words"),
    [
        ("devices/+/telemetry", "sites/x", "s", "same wildcards"),
        ("devices/#", "sites/+", "s", "same wildcards"),
        ("devices/+/t", "sites/{site}/+/t", "", "site"),
        ("devices/+/t", "sites/{site}/+/t", "a/+", "site"),
        ("devices/a#", "x/#", "s", "'#'"),
        ("$share/g/devices/+", "x/+", "s", "shared"),
    ],
)
def test_a_rule_that_cannot_map_topics_is_refused_saying_why(source, target, site, words):
    with pytest.raises(InvalidBridgeRule, match=words):
        compile_rule(source, target, site=site, where="[[bridge]] b out rule 1")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/#", "a", True),
        ("a/#", "b/#", False),
        ("a/+/c", "a/b/d", False),
        ("a", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("sites/s/devices/+/telemetry", "sites/s/commands/+", False),
        ("sites/s/#", "sites/s/commands/+", True),
    ],
)
def test_filters_overlap_when_some_topic_matches_both(a, b, overlap):
    assert filters_overlap(a, b) is overlap
    assert filters_overlap(b, a) is overlap


# -- configuration --------------------------------------------------------------------------------

BRIDGE_TOML = """
[broker]
port = 9999

[[bridge]]
name = "central"
host = "central.example"
protocol = "{protocol}"
keystore = "bridge/central"
site = "plant-7"
queue_max_messages = 10

[[bridge.out]]
local = "devices/+/telemetry"
remote = "sites/{{site}}/devices/+/telemetry"

[[bridge.in]]
remote = "{inbound}"
local = "devices/+/commands"

[[bridge]]
name = "backup"
host = "backup.example"
keystore = "/abs/store"
[[bridge.out]]
local = "devices/#"
remote = "backup/#"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / CONFIG_FILE).write_text(text)
    return home


def test_several_bridges_load_from_bridge_tables_and_env_overrides_still_apply(tmp_path):
    home = write_config(
        tmp_path, BRIDGE_TOML.format(protocol="5", inbound="sites/{site}/commands/+")
    )
    config = load_config(home, environ={"FLEETGATE_BROKER_PORT": "7777"})
    assert config.broker.port == 7777
    central, backup = config.bridges
    assert (central.name, central.host, central.port, central.queue_max_messages) == (
        "central",
        "central.example",
        8883,
        10,
    )
    plan = plan_bridge(config, central)
    assert plan.level is V5
    assert plan.keystore == home / "bridge" / "central"
    assert first_remap(plan.out, "devices/d1/telemetry") == "sites/plant-7/devices/d1/telemetry"
    assert first_remap(plan.inbound, "sites/plant-7/commands/d1") == "devices/d1/commands"
    assert plan_bridge(config, backup).keystore == Path("/abs/store")


def test_a_config_without_bridges_has_none(tmp_path):
    assert load_config(write_config(tmp_path, "[broker]\nport = 1\n"), environ={}).bridges == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[bridge]\nname = "x"\nhost = "h"\n', "array of tables"),
        ('[[bridge]]\nhost = "h"\n', "needs a name"),
        ('[[bridge]]\nname = "x"\n', "host"),
        ('[[bridge]]\nname = "x"\nhost = "h"\nqueue_max = 1\n', "unknown key"),
        ('[[bridge]]\nname = "x"\nhost = "h"\nport = "many"\n', "port"),
        ('[[bridge]]\nname = "x"\nhost = "h"\n[[bridge.out]]\nlocal = "a"\n', "local and a remote"),
        ('[[bridge]]\nname = "x"\nhost = "h"\n[[bridge]]\nname = "x"\nhost = "h"\n', "unique"),
    ],
)
def test_a_bad_bridge_table_is_a_config_error_naming_the_problem(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        load_config(write_config(tmp_path, text), environ={})


def test_a_311_bridge_whose_in_rule_would_receive_its_own_out_messages_is_refused(tmp_path):
    home = write_config(
        tmp_path, BRIDGE_TOML.format(protocol="3.1.1", inbound="sites/{site}/+/d1/telemetry")
    )
    config = load_config(home, environ={})
    with pytest.raises(InvalidBridgeRule, match="cannot suppress the echo"):
        plan_bridge(config, config.bridges[0])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"protocol": "4"}, "protocol"),
        ({"name": "bad/name"}, "valid id"),
        ({"keystore": ""}, "keystore"),
        ({"backoff_initial_s": 0.0}, "backoff"),
        ({"out": (), "inbound": ()}, "nothing would cross"),
    ],
)
def test_bridge_settings_the_broker_cannot_run_are_refused_at_start(tmp_path, change, words):
    import dataclasses

    home = write_config(tmp_path, BRIDGE_TOML.format(protocol="5", inbound="sites/x/cmd/+"))
    config = load_config(home, environ={})
    with pytest.raises(ConfigError, match=words):
        plan_bridge(config, dataclasses.replace(config.bridges[0], **change))


# -- the queue: bounds, order, window -------------------------------------------------------------


def item(seq: int, size: int = 10, topic: str = "t") -> Queued:
    return Queued(seq, topic, b"x", False, b"\x00", 1000.0 + seq, size)


def test_the_queue_refuses_beyond_its_message_and_byte_bounds_and_frees_room_on_ack():
    queue = OutQueue(max_messages=3, max_bytes=25)
    assert queue.reserve(10) and queue.reserve(10)
    assert not queue.reserve(10)  # 30 bytes > 25
    assert queue.reserve(5)
    assert not queue.reserve(1)  # 3 messages
    for seq in (1, 2, 3):
        queue.stored(item(seq, 10 if seq < 3 else 5))
    sent = queue.take(10)
    assert [i.seq for i in sent] == [1, 2, 3]
    assert queue.acked(sent[0].packet_id) is sent[0]
    assert (queue.messages, queue.bytes) == (2, 15)
    assert queue.reserve(10)


def test_acked_many_is_acked_for_each_id_and_skips_ids_not_in_flight():
    queue = OutQueue(max_messages=10, max_bytes=1_000)
    for seq in (1, 2, 3):
        queue.reserve(10)
        queue.stored(item(seq))
    sent = queue.take(10)
    done = queue.acked_many([sent[2].packet_id, 999, sent[0].packet_id, sent[0].packet_id])
    assert done == [sent[2], sent[0]]
    assert (queue.messages, queue.bytes, queue.in_flight) == (1, 10, 1)
    assert queue.floor() == 2


def test_unacknowledged_messages_go_first_again_in_order_after_a_lost_connection():
    queue = OutQueue(max_messages=100, max_bytes=10_000)
    for seq in range(1, 7):
        queue.reserve(10)
        queue.stored(item(seq))
    first = queue.take(4)
    queue.acked(first[1].packet_id)
    queue.rewind()
    assert [i.seq for i in queue.take(10)] == [1, 3, 4, 5, 6]
    assert queue.oldest() == 1001.0


def test_the_window_never_reuses_a_packet_id_still_in_flight():
    queue = OutQueue(max_messages=100, max_bytes=10_000)
    for seq in (1, 1 + 0xFFFF):  # same packet id
        queue.reserve(10)
        queue.stored(item(seq))
    assert [i.seq for i in queue.take(10)] == [1]
    queue.acked(item(1).packet_id)
    assert [i.seq for i in queue.take(10)] == [1 + 0xFFFF]


def test_beyond_its_memory_window_the_queue_leaves_messages_on_disk_and_reads_them_in_order():
    queue = OutQueue(max_messages=100, max_bytes=10_000, ram_limit=4)
    for seq in range(1, 11):
        queue.reserve(10)
        queue.stored(item(seq))
    assert [i.seq for i in queue.take(100)] == [1, 2, 3, 4]
    assert queue.load_from() == 4
    queue.loaded([item(seq) for seq in range(5, 9)])
    queue.stored(item(11))  # committed while 9 and 10 are still only on disk
    assert [i.seq for i in queue.take(100)] == [5, 6, 7, 8]
    assert queue.load_from() == 8
    queue.loaded([item(9), item(10), item(11)])
    assert [i.seq for i in queue.take(100)] == [9, 10, 11]
    assert queue.load_from() is None


# -- the store ------------------------------------------------------------------------------------


def new(bridge: str, n: int) -> NewMessage:
    return NewMessage(bridge, f"up/{n}", f"m{n}".encode(), n % 2 == 0, b"\x00", 1000.0 + n)


def test_the_store_keeps_messages_in_order_across_reopening_and_forgets_acked_ones(tmp_path):
    path = tmp_path / "bridge" / "queue.db"
    store = QueueStore(path)
    origin = store.origin
    first = store.write([new("a", 1), new("b", 2), new("a", 3)], [], {})
    seqs = [first, first + 1, first + 2]
    assert store.load("b", 0, 10, 0)[0].seq == seqs[1]
    # a's first message acknowledged: a's rows below seqs[1] go, b's row in range stays
    store.write([], [Acked("a", 0, seqs[2])], {"a": seqs[0]})
    assert [i.seq for i in store.load("b", 0, 10, 0)] == [seqs[1]]
    store.close()

    store = QueueStore(path)
    assert store.origin == origin  # the loop-prevention id survives restarts
    backlog = store.backlog("a")
    assert (backlog.messages, backlog.last_seq, backlog.oldest, backlog.sent_to) == (
        1,
        seqs[2],
        1003.0,
        seqs[0],
    )
    (loaded,) = store.load("a", 0, 100, backlog.sent_to)
    assert (loaded.topic, loaded.payload, loaded.retain, loaded.sent) == (
        "up/3",
        b"m3",
        False,
        False,
    )
    store.write([new("a", 4)], [Acked("a", seqs[2], seqs[2], (seqs[2],))], {})
    (later,) = store.load("a", 0, 100, 0)
    assert later.seq > seqs[2]  # sequence numbers are never reused
    store.close()


def test_user_properties_survive_the_store(tmp_path):
    props = Properties(user_properties=(("fleetgate-via", "abc"),), content_type="json")
    store = QueueStore(tmp_path / "q.db")
    row = NewMessage("a", "t", b"p", False, encode_properties(props), 1.0)
    store.write([row], [], {})
    (loaded,) = store.load("a", 0, 10, 0)
    assert loaded.properties == encode_properties(props)
    store.close()


def test_the_queue_floor_is_the_lowest_unacknowledged_sequence_number():
    queue = OutQueue(max_messages=100, max_bytes=10_000, ram_limit=4)
    assert queue.floor() == 1
    for seq in range(1, 7):
        queue.reserve(10)
        queue.stored(item(seq))  # 5 and 6 stay on disk
    sent = queue.take(3)
    assert queue.floor() == 1
    queue.acked(sent[1].packet_id)  # out of order: 1 still unacknowledged
    assert queue.floor() == 1
    queue.acked(sent[0].packet_id)
    assert queue.floor() == 3
    queue.acked(sent[2].packet_id)
    assert queue.floor() == 4
    queue.acked(queue.take(1)[0].packet_id)
    assert queue.floor() == 5  # the first one still on disk


# -- the upstream session, bytes only ---------------------------------------------------------


@pytest.mark.parametrize("level", [V5, V3])
def test_the_bridge_session_connects_persistently_and_subscribes_with_no_local_on_mqtt5(level):
    session = UpstreamSession(
        level, client_id="bridge-a", keep_alive=30, session_expiry=600, receive_maximum=64
    )
    server = Decoder()
    server.feed(session.connect() + session.subscribe(1, ("sites/s/commands/+",)))
    connect, subscribe = server.next_packet(), server.next_packet()
    assert isinstance(connect, Connect) and isinstance(subscribe, Subscribe)
    assert (connect.client_id, connect.clean_start, connect.keep_alive) == ("bridge-a", False, 30)
    (sub,) = subscribe.subscriptions
    assert sub.qos == QoS.AT_LEAST_ONCE
    assert sub.no_local is (level is V5)
    if level is V5:
        assert connect.properties.session_expiry_interval == 600


def test_the_session_turns_upstream_bytes_into_events_and_resends_with_dup():
    session = UpstreamSession(V5, client_id="b", keep_alive=0, session_expiry=0, receive_maximum=8)
    refused = session.receive(
        encode(
            ConnAck(
                reason_code=ReasonCode.NOT_AUTHORIZED,
                properties=Properties(reason_string="device b is revoked"),
            ),
            V5,
        )
    )
    assert refused == [ConnectRefused(0x87, "device b is revoked")]
    events = session.receive(
        encode(ConnAck(properties=Properties(receive_maximum=5)), V5)
        + encode(PubAck(packet_id=7, reason_code=ReasonCode.NOT_AUTHORIZED), V5)
        + encode(Publish(topic="x", payload=b"p", qos=QoS.AT_LEAST_ONCE, packet_id=3), V5)
    )
    assert events[0] == Accepted(False, 5, None)
    assert events[1] == Acknowledged(7, ReasonCode.NOT_AUTHORIZED, "")
    assert isinstance(events[2], Received) and events[2].publish.packet_id == 3
    resend = item(6)
    resend.sent = True
    decoder = Decoder(protocol_level=V5)
    decoder.feed(session.publish(resend))
    packet = decoder.next_packet()
    assert isinstance(packet, Publish) and packet.dup and packet.packet_id == resend.packet_id


@pytest.mark.parametrize("step", [1, 3, 5, 1000])
def test_success_pubacks_are_read_in_bulk_however_the_bytes_are_split(step):
    session = UpstreamSession(V5, client_id="b", keep_alive=0, session_expiry=0, receive_maximum=8)
    stream = (
        encode(ConnAck(), V5)
        + encode(PubAck(packet_id=1), V5)
        + encode(PubAck(packet_id=2, reason_code=ReasonCode.NOT_AUTHORIZED), V5)
        + encode(Publish(topic="x", payload=b"p" * 300, qos=QoS.AT_LEAST_ONCE, packet_id=3), V5)
        + encode(PubAck(packet_id=0x1234), V5)
    )
    events = []
    for at in range(0, len(stream), step):
        events += session.receive(stream[at : at + step])
    ids = [i for e in events if isinstance(e, AckedMany) for i in e.packet_ids]
    assert ids == [1, 0x1234]
    assert [type(e) for e in events if not isinstance(e, AckedMany)] == [
        Accepted,
        Acknowledged,
        Received,
    ]


def test_a_malformed_length_from_the_upstream_is_a_protocol_error():
    session = UpstreamSession(V5, client_id="b", keep_alive=0, session_expiry=0, receive_maximum=8)
    with pytest.raises(ProtocolError):
        session.receive(b"\x30\xff\xff\xff\xff\x01")


def test_mqtt_311_forwarding_carries_no_properties():
    session = UpstreamSession(V3, client_id="b", keep_alive=0, session_expiry=0, receive_maximum=8)
    props = encode_properties(Properties(user_properties=(("k", "v"),)))
    queued = Queued(1, "t", b"p", False, props, 0.0, 1)
    decoder = Decoder(protocol_level=V3)
    decoder.feed(session.publish(queued))
    packet = decoder.next_packet()
    assert isinstance(packet, Publish) and packet.properties == NO_PROPERTIES


@pytest.mark.parametrize("length", [0x80, 0xC1, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 0xFFFFFFF])
def test_the_remaining_length_is_the_codecs_variable_byte_integer(length):
    from broker.bridge.protocol import _varint
    from broker.mqtt._wire import write_varint

    assert _varint(length) == write_varint(length)


@pytest.mark.parametrize("level", [V5, V3])
@pytest.mark.parametrize("sent", [False, True])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("payload_size", [0, 64, 200, 20_000])
def test_forwarded_publish_bytes_are_the_codecs_bytes(level, sent, retain, payload_size):
    """The session puts the PUBLISH together from stored bytes; the codec must agree."""
    props = Properties(
        content_type="json", user_properties=(("a", "b"), ("fleetgate-via", "0123456789abcdef"))
    )
    for properties in (NO_PROPERTIES, props):
        for seq in (1, 0xFFFE, 0xFFFF, 70_000):
            session = UpstreamSession(
                level, client_id="b", keep_alive=0, session_expiry=0, receive_maximum=8
            )
            topic = "sites/s/devices/dé/telemetry"
            payload = bytes(range(256)) * (payload_size // 256) + b"x" * (payload_size % 256)
            queued = Queued(seq, topic, payload, retain, encode_properties(properties), 0.0, 1)
            queued.sent = sent
            expected = encode(
                Publish(
                    topic=topic,
                    payload=payload,
                    qos=QoS.AT_LEAST_ONCE,
                    retain=retain,
                    dup=sent,
                    packet_id=seq % 0xFFFF + 1,
                    properties=properties if level is V5 else NO_PROPERTIES,
                ),
                level,
            )
            assert session.publish(queued) == expected
            assert session.publish(queued) == expected  # the topic from the cache


# -- held acknowledgements in the sans-I/O connection -------------------------------------------


class FakeGate:
    """Bridges topics under ``bridged/``; remembers the callbacks so the test decides when
    the "disk" answers."""

    def __init__(self, verdict: GateVerdict = GateVerdict.HOLD) -> None:
        self.verdict = verdict
        self.waiting: list[Callable[[bool, float], None]] = []

    def admit(self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]):
        if not message.topic.startswith("bridged/"):
            return GateVerdict.ROUTE
        if self.verdict is GateVerdict.HOLD:
            self.waiting.append(on_stored)
        return self.verdict


def connected(level: int, gate: FakeGate) -> tuple[Connection, Decoder]:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    core.gate = gate
    conn = Connection(core, peer="t", identity=Identity("d1", 1), listener="tls", now=0.0)
    request = conn.receive_data(encode(Connect(client_id="d1"), level), 0.0)
    assert isinstance(request, AdmissionRequest)
    template = AclTemplate(publish=("bridged/#", "local/#"), subscribe=())
    conn.admission_done(Admitted("default", template.for_device("d1")), 0.0)
    decoder = Decoder(protocol_level=level)
    decoder.feed(conn.take_output())
    assert isinstance(decoder.next_packet(), ConnAck)
    return conn, decoder


def publish(conn: Connection, level: int, topic: str, packet_id: int) -> None:
    packet = Publish(topic=topic, payload=b"x", qos=QoS.AT_LEAST_ONCE, packet_id=packet_id)
    conn.receive_data(encode(packet, level), 0.0)


def answers(conn: Connection, decoder: Decoder) -> list[Packet]:
    decoder.feed(conn.take_output())
    out = []
    while (packet := decoder.next_packet()) is not None:
        out.append(packet)
    return out


def test_a_bridged_puback_waits_for_the_disk_and_later_pubacks_keep_their_order():
    gate = FakeGate()
    conn, decoder = connected(V5, gate)
    publish(conn, V5, "bridged/a", 1)
    publish(conn, V5, "local/b", 2)
    publish(conn, V5, "bridged/c", 3)
    assert answers(conn, decoder) == []  # nothing acknowledged before the first write lands
    gate.waiting[0](True, 0.0)
    assert answers(conn, decoder) == [PubAck(packet_id=1), PubAck(packet_id=2)]
    gate.waiting[1](False, 0.0)  # a failed write is an error, not a silent success
    (ack,) = answers(conn, decoder)
    assert isinstance(ack, PubAck) and ack.packet_id == 3 and ack.reason_code >= 0x80


def test_a_full_queue_is_0x97_on_mqtt5_and_an_unacknowledged_close_on_311():
    conn, decoder = connected(V5, FakeGate(GateVerdict.FULL))
    publish(conn, V5, "bridged/a", 1)
    assert answers(conn, decoder) == [PubAck(packet_id=1, reason_code=ReasonCode.QUOTA_EXCEEDED)]
    assert not conn.closing

    conn, decoder = connected(V3, FakeGate(GateVerdict.FULL))
    publish(conn, V3, "bridged/a", 1)
    assert answers(conn, decoder) == []  # no PUBACK: the client still holds the message
    assert conn.closing


def test_an_echo_of_a_forwarded_message_is_acknowledged_but_not_routed():
    conn, decoder = connected(V5, FakeGate(GateVerdict.LOOP))
    routed: list[Message] = []
    conn.core.publish = lambda message, now: routed.append(message)  # type: ignore[method-assign]
    publish(conn, V5, "bridged/a", 1)
    assert answers(conn, decoder) == [PubAck(packet_id=1)]
    assert routed == []


def test_the_origin_marker_is_appended_as_the_codec_would_encode_it():
    from broker.bridge.manager import ORIGIN_PROPERTY, _property_block, _strip_length

    marker = encode_properties(Properties(user_properties=((ORIGIN_PROPERTY, "0" * 16),)))
    for props in (
        Properties(content_type="json"),
        Properties(user_properties=(("k", "v" * 200),), payload_format_indicator=1),
        Properties(correlation_data=b"c" * 300, response_topic="r"),
    ):
        expected = encode_properties(
            dataclasses.replace(
                props, user_properties=(*props.user_properties, (ORIGIN_PROPERTY, "0" * 16))
            )
        )
        assert _property_block(_strip_length(encode_properties(props)) + _strip_length(marker)) == (
            expected
        )
