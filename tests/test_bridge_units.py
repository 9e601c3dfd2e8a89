"""The bridge's pure parts on their own: topic rules, configuration, the queue's bounds and
order, the SQLite store, the upstream session's bytes, and the connection's held PUBACKs."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.acl import AclTemplate
from broker.admission import Admitted, Identity
from broker.bridge.link import BridgeLink, cause
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
from broker.bridge.status import FULL_QUIET_S, BridgeCounters, FullAlarm, LinkState
from broker.bridge.store import Acked, NewMessage, QueueStore
from broker.bridge.topics import (
    InvalidBridgeRule,
    compile_rule,
    first_remap,
    remap,
)
from broker.connection import LINGER_MAX_S, LINGER_QUIET_S, AdmissionRequest, Connection
from broker.core import BrokerCore, CoreSettings, GateVerdict
from broker.metrics import Metrics
from broker.mqtt import (
    NO_PROPERTIES,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
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
from broker.routing import Message
from fleetgate.config import CONFIG_FILE, load_config
from fleetgate.errors import ConfigError
from fleetgate.topics import filters_overlap

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


# -- the link's reasons --------------------------------------------------------------------------


class QuietOwner:
    """A :class:`broker.bridge.link.LinkOwner` that takes nothing and says nothing."""

    async def connected(self, name: str) -> None:
        return None

    def inbound(self, name: str, publish: Publish, settle: Callable[[bool], None]) -> None: ...

    def acked(self, name: str, items: list[Queued]) -> None: ...

    def sent(self, name: str, seq: int) -> None: ...

    def disconnected(self, name: str) -> None: ...

    def want_more(self, name: str) -> None: ...


def first_link_error(tmp_path: Path, port: int) -> str:
    """Run a link to 127.0.0.1:``port`` (connect timeout 0.3 s) until its first failure."""
    home = write_config(tmp_path, BRIDGE_TOML.format(protocol="5", inbound="sites/x/cmd/+"))
    settings = dataclasses.replace(
        load_config(home, environ={}).bridges[0], host="127.0.0.1", port=port, connect_timeout_s=0.3
    )
    plan = plan_bridge(load_config(home, environ={}), settings)
    state = LinkState()

    async def run() -> str:
        link = BridgeLink(
            plan,
            OutQueue(max_messages=10, max_bytes=1000),
            BridgeCounters(),
            state,
            QuietOwner(),
            context=ssl.create_default_context,
            client_id=lambda: "c",
        )
        task = asyncio.create_task(link.run())
        try:
            while not state.last_error:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        return state.last_error

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_a_link_that_times_out_says_after_how_long(tmp_path):
    """Issue 11: reported as ``cannot reach 127.0.0.1:28883: `` with nothing after it."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never answers TLS
        error = first_link_error(tmp_path, silent.getsockname()[1])
    assert error.endswith(": timed out after 0.3 s"), error


def test_a_link_refused_at_tcp_says_why(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    error = first_link_error(tmp_path, port)
    assert error.startswith(f"cannot reach 127.0.0.1:{port}: ") and "Errno 111" in error, error


def test_an_exception_without_a_message_is_named_by_its_type():
    assert cause(ConnectionResetError()) == "ConnectionResetError"
    assert cause(OSError(104, "Connection reset by peer")) == "[Errno 104] Connection reset by peer"


# -- the full-queue alarm -------------------------------------------------------------------------


def test_a_queue_that_keeps_touching_its_bound_is_one_full_episode():
    """Issue 11: "queue FULL" was logged 274 times in one outage, as devices resending on
    reconnect refilled the queue each time the upstream took a little."""
    alarm = FullAlarm()
    assert alarm.refusal(100.0)  # starts the episode: logged
    assert not alarm.settle(101.0, room=True)  # room again, but refusals are recent
    assert not any(alarm.refusal(100.0 + t) for t in range(2, 60, 3))  # refills: not logged
    assert not alarm.settle(100.0 + 59 + FULL_QUIET_S, room=False)  # quiet, but still full
    assert alarm.raised
    assert alarm.settle(100.0 + 59 + FULL_QUIET_S, room=True)  # the end: logged once
    assert not alarm.raised and alarm.refused == 21
    assert not alarm.settle(500.0, room=True)
    assert alarm.refusal(500.0) and alarm.refused == 1  # a new episode


# -- the queue: bounds, order, window -------------------------------------------------------------


def item(seq: int, size: int = 10, topic: str = "t") -> Queued:
    return Queued(seq, topic, b"x", False, b"\x00", 1000.0 + seq, size)


def test_the_queue_refuses_beyond_its_message_and_byte_bounds_and_frees_room_on_ack():
    queue = OutQueue(max_messages=3, max_bytes=25)
    assert queue.reserve(10, 1000.0) and queue.reserve(10, 1000.0)
    assert not queue.reserve(10, 1000.0)  # 30 bytes > 25
    assert queue.reserve(5, 1000.0)
    assert not queue.reserve(1, 1000.0)  # 3 messages
    for seq in (1, 2, 3):
        queue.stored(item(seq, 10 if seq < 3 else 5))
    sent = queue.take(10)
    assert [i.seq for i in sent] == [1, 2, 3]
    assert queue.acked(sent[0].packet_id) is sent[0]
    assert (queue.messages, queue.bytes) == (2, 15)
    assert queue.reserve(10, 1000.0)


def test_acked_many_is_acked_for_each_id_and_skips_ids_not_in_flight():
    queue = OutQueue(max_messages=10, max_bytes=1_000)
    for seq in (1, 2, 3):
        queue.reserve(10, 1000.0)
        queue.stored(item(seq))
    sent = queue.take(10)
    done = queue.acked_many([sent[2].packet_id, 999, sent[0].packet_id, sent[0].packet_id])
    assert done == [sent[2], sent[0]]
    assert (queue.messages, queue.bytes, queue.in_flight) == (1, 10, 1)
    assert queue.floor() == 2


def test_unacknowledged_messages_go_first_again_in_order_after_a_lost_connection():
    queue = OutQueue(max_messages=100, max_bytes=10_000)
    for seq in range(1, 7):
        queue.reserve(10, 1000.0)
        queue.stored(item(seq))
    first = queue.take(4)
    queue.acked(first[1].packet_id)
    queue.rewind()
    assert [i.seq for i in queue.take(10)] == [1, 3, 4, 5, 6]
    assert queue.oldest() == 1001.0


def test_the_window_never_reuses_a_packet_id_still_in_flight():
    queue = OutQueue(max_messages=100, max_bytes=10_000)
    for seq in (1, 1 + 0xFFFF):  # same packet id
        queue.reserve(10, 1000.0)
        queue.stored(item(seq))
    assert [i.seq for i in queue.take(10)] == [1]
    queue.acked(item(1).packet_id)
    assert [i.seq for i in queue.take(10)] == [1 + 0xFFFF]


def test_beyond_its_memory_window_the_queue_leaves_messages_on_disk_and_reads_them_in_order():
    queue = OutQueue(max_messages=100, max_bytes=10_000, ram_limit=4)
    for seq in range(1, 11):
        queue.reserve(10, 1000.0)
        queue.stored(item(seq))
    assert [i.seq for i in queue.take(100)] == [1, 2, 3, 4]
    assert queue.load_from() == 4
    queue.loaded([item(seq) for seq in range(5, 9)])
    queue.reserve(10, 1011.0)
    queue.stored(item(11))  # committed while 9 and 10 are still only on disk
    assert [i.seq for i in queue.take(100)] == [5, 6, 7, 8]
    assert queue.load_from() == 8
    queue.loaded([item(9), item(10), item(11)])
    assert [i.seq for i in queue.take(100)] == [9, 10, 11]
    assert queue.load_from() is None


def test_a_queue_with_messages_always_knows_how_old_its_oldest_is():
    """Issue 11: the status showed 100 queued messages with ``oldest_age_s`` null. Messages
    only on disk, or still being committed, count too."""
    queue = OutQueue(max_messages=100, max_bytes=10_000, ram_limit=4)
    assert queue.oldest() is None
    assert queue.reserve(10, 1001.0)  # being committed
    assert queue.oldest() == 1001.0
    for seq in range(1, 11):
        if seq > 1:
            queue.reserve(10, 1000.0 + seq)
        queue.stored(item(seq))  # 5 to 10 stay on disk
    assert queue.oldest() == 1001.0
    for sent in queue.take(100):
        queue.acked(sent.packet_id)
    assert queue.messages == 6 and queue.oldest() == 1005.0  # on disk only
    queue.loaded([item(5), item(6)])  # read back; 7 to 10 still on disk
    for sent in queue.take(100):
        queue.acked(sent.packet_id)
    assert queue.messages == 4
    assert 1006.0 <= queue.oldest() <= 1007.0  # at most one arrival early  # type: ignore[operator]


def test_the_oldest_age_is_never_missing_while_the_queue_is_not_empty():
    """A random walk of reservations, commits, sends, acknowledgements, reconnects and reads
    from disk, as the manager drives the queue; the age is checked after every step."""
    rng = random.Random(11)
    queue = OutQueue(max_messages=50, max_bytes=10_000, ram_limit=8)
    disk: dict[int, Queued] = {}  # committed, not acknowledged
    reserved: list[int] = []  # sequence numbers of reservations, commit pending
    window: list[int] = []  # packet ids in flight
    next_seq = 1
    for _ in range(5_000):
        step = rng.random()
        if step < 0.3 and queue.reserve(10, 1000.0 + next_seq):
            reserved.append(next_seq)
            next_seq += 1
        elif step < 0.5 and reserved:
            for seq in reserved[: rng.randint(1, len(reserved))]:
                disk[seq] = item(seq)
                queue.stored(disk[seq])
                reserved.remove(seq)
        elif step < 0.65:
            window += [sent.packet_id for sent in queue.take(rng.randint(1, 6))]
        elif step < 0.85:
            rng.shuffle(window)
            count = rng.randint(0, len(window))
            for done in queue.acked_many(window[:count]):
                del disk[done.seq]
            del window[:count]
        elif step < 0.9:
            queue.rewind()
            window.clear()
        elif (after := queue.load_from()) is not None:
            queue.loaded([disk[s] for s in sorted(disk) if s > after][:4])
        unacked = sorted([*disk, *reserved])
        assert queue.messages == len(unacked)
        oldest = queue.oldest()
        if not unacked:
            assert oldest is None
        else:
            assert oldest is not None, f"{queue.messages} queued, no age"
            assert 1000.0 + unacked[0] - 1 <= oldest <= 1000.0 + unacked[0]


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
        queue.reserve(10, 1000.0)
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


@pytest.mark.parametrize(
    "length", [0, 0x7F, 0x80, 0xC1, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000, 0xFFFFFFF]
)
def test_the_one_variable_byte_integer_encoder_round_trips_at_every_size(length):
    """The bridge writes remaining lengths with the codec's encoder (its fast path included)."""
    from broker.mqtt import decode_varint, write_varint

    encoded = write_varint(length)
    assert len(encoded) == 1 + (length >= 0x80) + (length >= 0x4000) + (length >= 0x200000)
    assert decode_varint(encoded, 0, len(encoded)) == (length, len(encoded))


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

    def offer(self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]):
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
    conn.check_timeouts(LINGER_QUIET_S / 2)
    assert not conn.closing  # lingers while the client may still read earlier PUBACKs
    conn.check_timeouts(LINGER_QUIET_S)
    assert conn.closing


class FillingGate(FakeGate):
    """Holds the first ``room`` bridged messages, then answers FULL."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def offer(self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]):
        if message.topic.startswith("bridged/") and len(self.waiting) >= self.room:
            return GateVerdict.FULL
        return super().offer(message, dup, on_stored)


def test_a_311_close_for_a_full_queue_first_acknowledges_every_message_already_queued():
    """Issue 11: the close dropped the held PUBACKs of messages the bridge had committed; the
    client resent them all on reconnect, into the same full queue, forever."""
    gate = FillingGate(room=2)
    conn, decoder = connected(V3, gate)
    data = b"".join(
        encode(Publish(topic=t, payload=b"x", qos=QoS.AT_LEAST_ONCE, packet_id=i), V3)
        for i, t in enumerate(["bridged/a", "local/b", "bridged/c", "bridged/d", "bridged/e"], 1)
    )
    conn.receive_data(data, 0.0)  # d finds the queue full; e is not read
    assert answers(conn, decoder) == [] and not conn.closing
    conn.receive_data(encode(PingReq(), V3), 1.0)  # the client waits: keep it there
    assert answers(conn, decoder) == [PingResp()]
    gate.waiting[0](True, 2.0)
    assert answers(conn, decoder) == [PubAck(packet_id=1), PubAck(packet_id=2)]
    assert not conn.closing
    gate.waiting[1](True, 3.0)
    assert answers(conn, decoder) == [PubAck(packet_id=3)]  # d and e: never acknowledged
    assert conn.core.sessions == {}  # the clean session ended when the draining began
    conn.receive_data(encode(Publish(topic="bridged/f", payload=b"x"), V3), 3.5)  # discarded
    conn.check_timeouts(3.5 + LINGER_QUIET_S / 2)
    assert not conn.closing  # the client is still sending: closing now would reset it
    conn.check_timeouts(3.5 + LINGER_QUIET_S)
    assert conn.closing and answers(conn, decoder) == []


def test_a_311_client_that_never_goes_quiet_is_closed_after_the_longest_linger():
    conn, _ = connected(V3, FakeGate(GateVerdict.FULL))
    publish(conn, V3, "bridged/a", 1)
    for tick in range(1, int(LINGER_MAX_S / 0.1)):
        conn.receive_data(encode(PingReq(), V3), tick * 0.1)
        conn.check_timeouts(tick * 0.1)
        assert not conn.closing
    conn.check_timeouts(LINGER_MAX_S)
    assert conn.closing


def test_a_311_client_that_goes_away_while_its_acknowledgements_wait_is_simply_closed():
    gate = FillingGate(room=1)
    conn, decoder = connected(V3, gate)
    publish(conn, V3, "bridged/a", 1)
    publish(conn, V3, "bridged/b", 2)
    conn.receive_data(encode(Disconnect(), V3), 1.0)
    assert conn.closing
    gate.waiting[0](True, 2.0)
    assert answers(conn, decoder) == []


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
