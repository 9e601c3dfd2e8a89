"""MQTT 5 extras the broker offers on its own initiative: topic aliases towards a client that
allows them (section 3.3.2.3.4) and a Server Keep Alive below the client's (3.2.2.3.14).

The wire bytes come from a raw client on fleetgate's codec, paho-mqtt 2.2 shows what a real
client makes of them. Neither paho 2.2 nor libmosquitto 2.0 resolves the aliases it receives
(paho's ``_handle_publish`` hands the application the empty topic name with the ``TopicAlias``
property; libmosquitto 2.0's ``handle__publish`` fails on an empty topic name), so only a
client that resolves them should send a Topic Alias Maximum: a paho application that does
keeps the map itself, as the test here does.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V311,
    WAIT_S,
    Paho,
    RawClient,
    RunningBroker,
    enroll,
    running_broker,  # noqa: F401
)
from paho.mqtt.properties import Properties as PahoProperties

from broker import Broker
from broker.acl import DEFAULT_TEMPLATE
from broker.admission import Admitted, Identity
from broker.connection import Connection
from broker.core import BrokerCore, CoreSettings
from broker.metrics import Metrics
from broker.mqtt import (
    NO_PROPERTIES,
    Connect,
    Decoder,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    encode,
)
from broker.routing import Message
from broker.session import Delivery
from fleetgate.config import load_config
from fleetgate.errors import ConfigError

GO = "devices/sensor-1/commands/go"
STOP = "devices/sensor-1/commands/stop"
WAIT = "devices/sensor-1/commands/wait"


@pytest.fixture
def pair(fleet):
    """ops-1 sends commands to sensor-1 (group ``controllers``)."""
    fleet.registry.set_acl(
        "controllers", publish=["devices/+/commands/#"], subscribe=[], actor="test"
    )
    return enroll(fleet, "sensor-1"), enroll(fleet, "ops-1", group="controllers")


@pytest.fixture
def capped(fleet) -> Iterator[RunningBroker]:
    """A broker that holds MQTT 5 clients to a keep-alive of 1 s."""
    running = RunningBroker(fleet, max_keep_alive_s=1).start()
    yield running
    running.stop()


def commander(broker: RunningBroker, creds) -> Paho:
    client = Paho(broker, creds)
    assert client.connect()[0] == 0
    return client


def subscribed(raw: RawClient, qos: QoS = QoS.AT_MOST_ONCE, **connect: object) -> None:
    assert raw.connect(client_id="sensor-1", **connect).reason_code == ReasonCode.SUCCESS
    raw.send(
        Subscribe(
            packet_id=1,
            subscriptions=(Subscription(topic_filter="devices/sensor-1/commands/#", qos=qos),),
        )
    )
    assert raw.receive() == SubAck(packet_id=1, reason_codes=(ReasonCode(qos),))


def wire(raw: RawClient, size: int) -> bytes:
    """Exactly ``size`` bytes as they came off the socket (nothing decoded)."""
    data = b""
    raw.sock.settimeout(WAIT_S)
    while len(data) < size:
        chunk = raw.sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def paho_asking_for_aliases(broker: RunningBroker, creds, maximum: int) -> Paho:
    """paho with Topic Alias Maximum in its CONNECT (the test helper's connect sends none)."""
    client = Paho(broker, creds)
    properties = PahoProperties(mqtt.PacketTypes.CONNECT)
    properties.TopicAliasMaximum = maximum
    client.client.connect("localhost", broker.port, keepalive=60, properties=properties)
    client.client.loop_start()
    assert client.events.connack.get(timeout=WAIT_S)[0] == 0
    return client


# -- topic aliases ---------------------------------------------------------------------------------


def test_alias_is_sent_with_the_topic_once_then_with_an_empty_topic(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    subscribed(raw, properties=Properties(topic_alias_maximum=4))
    sender = commander(broker, ops)
    sender.publish(GO, b"1")
    name = GO.encode()
    assert wire(raw, 37) == b"\x30\x23\x00\x1c" + name + b"\x03\x23\x00\x01" + b"1"
    sender.publish(GO, b"2")
    assert wire(raw, 9) == b"\x30\x07\x00\x00\x03\x23\x00\x01" + b"2"
    sender.close()
    raw.close()


def test_aliases_are_handed_out_first_come_up_to_the_clients_maximum(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    subscribed(raw, properties=Properties(topic_alias_maximum=2))
    sender = commander(broker, ops)
    for topic in (GO, STOP, WAIT, GO, WAIT, STOP):
        sender.publish(topic, b"x")
    seen = []
    for _ in range(6):
        packet = raw.receive()
        assert isinstance(packet, Publish)
        seen.append((packet.topic, packet.properties.topic_alias))
    assert seen == [(GO, 1), (STOP, 2), (WAIT, None), ("", 1), (WAIT, None), ("", 2)]
    sender.close()
    raw.close()


@pytest.mark.parametrize("maximum", [None, 0])
def test_client_without_a_topic_alias_maximum_gets_full_topics_and_no_alias(broker, pair, maximum):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    subscribed(raw, properties=Properties(topic_alias_maximum=maximum))
    sender = commander(broker, ops)
    sender.publish(GO, b"1")
    sender.publish(GO, b"2")
    for payload in (b"1", b"2"):
        assert raw.receive() == Publish(topic=GO, payload=payload)
    sender.close()
    raw.close()


def test_mqtt_311_and_plain_paho_clients_see_no_alias(broker, pair):
    sensor, ops = pair
    sender = commander(broker, ops)
    for version in (V311, mqtt.MQTTv5):
        device = Paho(broker, sensor, version=version)
        assert device.connect()[0] == 0
        device.subscribe("devices/sensor-1/commands/#", 0)
        for payload in (b"1", b"2"):
            sender.publish(GO, payload)
            message = device.message()
            assert (message.topic, message.payload) == (GO, payload)
            assert not hasattr(message.properties, "TopicAlias")
        device.close()
    sender.close()


def test_messages_resent_after_a_reconnect_carry_their_topic_names(broker, pair):
    """Aliases do not outlive a connection (MQTT-3.3.2-7): the DUP resends name their topic."""
    sensor, ops = pair
    persistent: dict[str, object] = {
        "clean_start": False,
        "properties": Properties(topic_alias_maximum=4, session_expiry_interval=600),
    }
    raw = RawClient(broker, sensor)
    subscribed(raw, QoS.AT_LEAST_ONCE, **persistent)
    sender = commander(broker, ops)
    sender.publish(GO, b"1", qos=1)
    sender.publish(GO, b"2", qos=1)
    first, second = raw.receive(), raw.receive()
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert (first.topic, second.topic, second.properties.topic_alias) == (GO, "", 1)
    raw.close()  # neither acknowledged
    again = RawClient(broker, sensor)
    assert again.connect(client_id="sensor-1", **persistent).session_present
    resent = [again.receive(), again.receive()]
    assert [(p.topic, p.payload, p.dup, p.properties.topic_alias) for p in resent] == [  # type: ignore[union-attr]
        (GO, b"1", True, None),
        (GO, b"2", True, None),
    ]
    again.send(*(PubAck(packet_id=p.packet_id) for p in resent))  # type: ignore[union-attr]
    sender.publish(GO, b"3", qos=1)  # the new connection sets the alias afresh
    fresh = again.receive()
    assert isinstance(fresh, Publish)
    assert (fresh.topic, fresh.properties.topic_alias) == (GO, 1)
    sender.close()
    again.close()


def test_paho_that_asks_for_aliases_gets_the_alias_and_an_empty_topic_to_resolve(broker, pair):
    sensor, ops = pair
    device = paho_asking_for_aliases(broker, sensor, 8)
    device.subscribe("devices/sensor-1/commands/#", 1)
    sender = commander(broker, ops)
    aliases: dict[int, str] = {}
    resolved = []
    for topic in (GO, GO, STOP, GO):
        sender.publish(topic, topic.encode(), qos=1)
        message = device.message()
        alias = message.properties.TopicAlias
        if message.topic:
            aliases[alias] = message.topic
        resolved.append((aliases[alias], message.topic == "", message.payload))
    assert resolved == [
        (GO, False, GO.encode()),
        (GO, True, GO.encode()),
        (STOP, False, STOP.encode()),
        (GO, True, GO.encode()),
    ]
    sender.close()
    device.close()


def test_alias_is_not_kept_for_a_packet_dropped_as_too_large():
    """A PUBLISH over the client's Maximum Packet Size is dropped (MQTT-3.1.2-25); had it set
    an alias, the next PUBLISH on its topic would name an alias the client never saw."""
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    conn = Connection(core, peer="test", identity=Identity("sensor-1", 1), listener="tls", now=0)
    limits = Properties(topic_alias_maximum=4, maximum_packet_size=64)
    conn.receive_data(encode(Connect(client_id="sensor-1", properties=limits), 5), 0)
    conn.admission_done(Admitted("default", DEFAULT_TEMPLATE.for_device("sensor-1")), 0)
    for payload in (b"x" * 64, b"small", b"again"):
        message = Message(GO, payload, QoS.AT_MOST_ONCE, False, NO_PROPERTIES, "ops-1")
        conn.send(Delivery(message, QoS.AT_MOST_ONCE, False), 0)
    decoder = Decoder(protocol_level=5)
    decoder.feed(conn.take_output())
    packets = []
    while (packet := decoder.next_packet()) is not None:
        packets.append(packet)
    assert [(p.topic, p.payload, p.properties.topic_alias) for p in packets[1:]] == [  # type: ignore[attr-defined]
        (GO, b"small", 1),
        ("", b"again", 1),
    ]
    assert core.metrics.dropped["too_large"] == 1


# -- Server Keep Alive -----------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [60, 0])
def test_server_keep_alive_caps_a_longer_or_absent_keep_alive(capped, pair, asked):
    raw = RawClient(capped, pair[0])
    connack = raw.connect(client_id="sensor-1", keep_alive=asked)
    assert connack.properties.server_keep_alive == 1
    raw.close()


def test_keep_alive_within_the_cap_gets_no_server_keep_alive(broker, pair):
    """Default cap (600 s): 60 is left alone, none is capped; each CONNACK is right although
    the broker encodes its accepting CONNACK once per kind."""
    for asked, told in ((60, None), (0, 600), (600, None), (601, 600), (60, None)):
        raw = RawClient(broker, pair[0])
        assert (
            raw.connect(client_id="sensor-1", keep_alive=asked).properties.server_keep_alive == told
        )
        raw.close()


def test_client_silent_for_one_and_a_half_server_keep_alives_is_disconnected(capped, pair):
    raw = RawClient(capped, pair[0])
    raw.connect(client_id="sensor-1", keep_alive=60)
    raw.send(PingReq())
    assert raw.receive() == PingResp()
    started = time.monotonic()
    goodbye = raw.receive(timeout=5)  # silent from now on; the client's own 60 s would wait 90
    waited = time.monotonic() - started
    assert isinstance(goodbye, Disconnect) and goodbye.reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    assert 1.5 <= waited <= 2.5  # 1.5 x the server's 1 s, checked every 0.5 s
    raw.close()


def test_paho_reads_server_keep_alive_and_pings_within_it(capped, pair):
    device = Paho(capped, pair[0], keep_alive=60)
    code, _, properties = device.connect()
    assert code == 0 and properties.ServerKeepAlive == 1
    with pytest.raises(queue.Empty):  # paho pings every second, so it stays
        device.disconnect_code(timeout=3)
    device.close()


def test_mqtt_311_client_keeps_the_keep_alive_it_asked_for(capped, pair):
    """3.1.1 has no Server Keep Alive: a cap the client cannot be told is not enforced."""
    raw = RawClient(capped, pair[0], level=4)
    assert raw.connect(client_id="sensor-1", keep_alive=60).properties == Properties()
    raw.nothing(within=2.5)  # past 1.5 x the cap
    raw.send(PingReq())
    assert raw.receive() == PingResp()
    raw.close()


def test_max_keep_alive_is_read_from_the_config_file_and_checked(fleet, tmp_path: Path):
    (tmp_path / "fleetgate.toml").write_text("[broker]\nmax_keep_alive_s = 120\n")
    assert load_config(tmp_path, environ={}).broker.max_keep_alive_s == 120
    too_long = dataclasses.replace(fleet.config.broker, max_keep_alive_s=65536)
    with pytest.raises(ConfigError, match="max_keep_alive_s"):
        Broker(dataclasses.replace(fleet.config, broker=too_long))
