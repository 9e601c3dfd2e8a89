"""Message delivery as the MQTT 3.1.1 and 5.0 specifications promise it: QoS 1 and 2 flows,
retained messages, wills, persistent sessions, takeover, keep-alive and the MQTT 5 extras.

paho-mqtt and Mosquitto's clients drive the common paths; a raw client on fleetgate's codec
checks what those clients hide (DUP resends, withheld acknowledgements, topic aliases).
"""

from __future__ import annotations

import time
from dataclasses import replace

import paho.mqtt.client as mqtt
import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Paho,
    RawClient,
    RunningBroker,
    enroll,
    mosquitto,
    running_broker,  # noqa: F401
)
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode

from broker.mqtt import (
    ConnAck,
    Disconnect,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    encode,
)

BOTH = pytest.mark.parametrize("version", [V311, V5])


@pytest.fixture
def pair(fleet):
    """ops-1 sends commands to sensor-1 and reads its telemetry (group ``controllers``)."""
    fleet.registry.set_acl(
        "controllers",
        publish=["devices/+/commands/#"],
        subscribe=["devices/+/telemetry/#"],
        actor="test",
    )
    return enroll(fleet, "sensor-1"), enroll(fleet, "ops-1", group="controllers")


def connected(broker: RunningBroker, creds, **kwargs) -> Paho:
    client = Paho(broker, creds, **kwargs)
    code, _, _ = client.connect()
    assert code == 0
    return client


# -- QoS -------------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_message_is_delivered_at_the_lower_of_publish_and_subscription_qos(
    broker, pair, version, qos
):
    sensor, ops = pair
    sub = connected(broker, sensor, version=version)
    assert sub.subscribe("devices/sensor-1/commands/#", 1) == [1]
    pub = connected(broker, ops, version=version)
    assert pub.publish("devices/sensor-1/commands/go", b"payload", qos=qos) == 0
    message = sub.message()
    assert (message.topic, message.payload, message.qos) == (
        "devices/sensor-1/commands/go",
        b"payload",
        min(qos, 1),
    )
    sub.no_message(0.2)
    sub.close()
    pub.close()


def test_qos2_publish_resent_with_dup_is_delivered_exactly_once(broker, pair):
    sensor, ops = pair
    sub = connected(broker, sensor)
    sub.subscribe("devices/sensor-1/commands/#", 2)
    raw = RawClient(broker, ops)
    assert raw.connect(client_id="ops-1").reason_code == 0
    publish = Publish(
        topic="devices/sensor-1/commands/x", payload=b"once", qos=QoS.EXACTLY_ONCE, packet_id=7
    )
    raw.send(publish)
    assert raw.receive() == PubRec(packet_id=7)
    raw.send(replace(publish, dup=True))  # as if PUBREC had been lost
    assert raw.receive() == PubRec(packet_id=7)
    raw.send(PubRel(packet_id=7))
    assert raw.receive() == PubComp(packet_id=7)
    raw.send(PubRel(packet_id=7))  # a late duplicate PUBREL
    assert raw.receive() == PubComp(packet_id=7, reason_code=ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
    assert sub.message().payload == b"once"
    sub.no_message()
    raw.close()
    sub.close()


def test_outgoing_qos2_runs_publish_pubrec_pubrel_pubcomp(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    raw.connect(client_id="sensor-1")
    raw.send(
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(topic_filter="devices/sensor-1/commands/#", qos=QoS.EXACTLY_ONCE),
            ),
        )
    )
    assert raw.receive() == SubAck(packet_id=1, reason_codes=(ReasonCode.GRANTED_QOS_2,))
    pub = connected(broker, ops)
    pub.publish("devices/sensor-1/commands/x", b"2", qos=2)
    incoming = raw.receive()
    assert isinstance(incoming, Publish) and incoming.qos == 2 and not incoming.dup
    raw.send(PubRec(packet_id=incoming.packet_id))
    assert raw.receive() == PubRel(packet_id=incoming.packet_id)
    raw.send(PubComp(packet_id=incoming.packet_id))
    raw.nothing()
    raw.close()
    pub.close()


def test_unacknowledged_qos1_is_resent_with_dup_when_the_session_resumes(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    connack = raw.connect(
        client_id="sensor-1", clean_start=True, properties=Properties(session_expiry_interval=300)
    )
    assert not connack.session_present
    raw.send(
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(topic_filter="devices/sensor-1/commands/#", qos=QoS.AT_LEAST_ONCE),
            ),
        )
    )
    raw.receive()
    pub = connected(broker, ops)
    pub.publish("devices/sensor-1/commands/x", b"ack me", qos=1)
    first = raw.receive()
    assert isinstance(first, Publish) and not first.dup
    raw.close()  # no PUBACK
    again = RawClient(broker, sensor)
    connack = again.connect(
        client_id="sensor-1", clean_start=False, properties=Properties(session_expiry_interval=300)
    )
    assert connack.session_present
    resent = again.receive()
    assert isinstance(resent, Publish)
    assert (resent.dup, resent.packet_id, resent.payload) == (True, first.packet_id, b"ack me")
    again.send(PubAck(packet_id=resent.packet_id))
    again.nothing()
    again.close()
    pub.close()


def test_receive_maximum_holds_back_qos1_until_acknowledged(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    raw.connect(client_id="sensor-1", properties=Properties(receive_maximum=1))
    raw.send(
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(topic_filter="devices/sensor-1/commands/#", qos=QoS.AT_LEAST_ONCE),
            ),
        )
    )
    raw.receive()
    pub = connected(broker, ops)
    for n in range(3):
        pub.publish("devices/sensor-1/commands/x", str(n).encode(), qos=1)
    got = []
    for _ in range(3):
        message = raw.receive()
        assert isinstance(message, Publish)
        got.append(message.payload)
        raw.nothing(0.2)  # nothing more until this one is acknowledged
        raw.send(PubAck(packet_id=message.packet_id))
    assert got == [b"0", b"1", b"2"]
    raw.close()
    pub.close()


def test_message_larger_than_the_clients_maximum_packet_size_is_not_sent(broker, pair):
    sensor, ops = pair
    raw = RawClient(broker, sensor)
    raw.connect(client_id="sensor-1", properties=Properties(maximum_packet_size=100))
    raw.send(
        Subscribe(
            packet_id=1, subscriptions=(Subscription(topic_filter="devices/sensor-1/commands/#"),)
        )
    )
    raw.receive()
    pub = connected(broker, ops)
    pub.publish("devices/sensor-1/commands/big", b"x" * 200)
    pub.publish("devices/sensor-1/commands/small", b"x")
    assert raw.receive().payload == b"x"  # type: ignore[union-attr]
    assert broker.metric("messages_dropped_total", 'reason="too_large"') == 1
    raw.close()
    pub.close()


# -- retained messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_retained_message_reaches_later_subscribers_until_an_empty_payload_clears_it(
    broker, pair, version
):
    sensor, ops = pair
    result = mosquitto(
        "mosquitto_pub",
        broker,
        sensor,
        "-t",
        "devices/sensor-1/telemetry/fw",
        "-m",
        "1.2.3",
        "-r",
        "-q",
        "1",
        version=version,
    )
    assert result.returncode == 0
    watcher = connected(broker, ops, version=V5 if version == "mqttv5" else V311)
    watcher.subscribe("devices/+/telemetry/#", 1)
    retained = watcher.message()
    assert (retained.topic, retained.payload, retained.retain) == (
        "devices/sensor-1/telemetry/fw",
        b"1.2.3",
        True,
    )
    watcher.close()
    mosquitto(
        "mosquitto_pub",
        broker,
        sensor,
        "-t",
        "devices/sensor-1/telemetry/fw",
        "-n",
        "-r",
        version=version,
    )
    late = connected(broker, ops)
    late.subscribe("devices/+/telemetry/#", 1)
    late.no_message()
    late.close()
    assert broker.metric("retained_messages") == 0


def test_live_message_has_retain_cleared_unless_retain_as_published(broker, pair):
    sensor, ops = pair
    plain = connected(broker, ops)
    plain.subscribe("devices/+/telemetry/#", 1)
    sensor_client = connected(broker, sensor)
    sensor_client.publish("devices/sensor-1/telemetry/fw", b"2", qos=1, retain=True)
    assert plain.message().retain is False
    plain.close()
    keeping = connected(broker, ops)
    keeping.subscribe("devices/+/telemetry/#", 1, retainAsPublished=True, retainHandling=2)
    keeping.no_message(0.3)  # retain handling 2: no retained message on subscribe
    sensor_client.publish("devices/sensor-1/telemetry/fw", b"3", qos=1, retain=True)
    assert keeping.message().retain is True
    keeping.close()
    sensor_client.close()


def test_retain_handling_1_sends_retained_only_for_a_new_subscription(broker, pair):
    sensor, ops = pair
    sensor_client = connected(broker, sensor)
    sensor_client.publish("devices/sensor-1/telemetry/fw", b"1", qos=1, retain=True)
    sensor_client.close()
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 1, retainHandling=1)
    assert watcher.message().payload == b"1"
    watcher.subscribe("devices/+/telemetry/#", 1, retainHandling=1)
    watcher.no_message(0.3)
    watcher.subscribe("devices/+/telemetry/#", 1, retainHandling=0)
    assert watcher.message().payload == b"1"
    watcher.close()


# -- wills -----------------------------------------------------------------------------------------


@BOTH
def test_will_is_published_when_a_device_vanishes_without_disconnect(broker, pair, version):
    sensor, ops = pair
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 1)
    device = connected(
        broker,
        sensor,
        version=version,
        will=("devices/sensor-1/telemetry/status", b"offline", 1, False),
    )
    device.drop()
    will = watcher.message()
    assert (will.topic, will.payload, will.qos) == (
        "devices/sensor-1/telemetry/status",
        b"offline",
        1,
    )
    watcher.close()


@BOTH
def test_will_is_not_published_after_a_normal_disconnect(broker, pair, version):
    sensor, ops = pair
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 1)
    device = connected(
        broker,
        sensor,
        version=version,
        will=("devices/sensor-1/telemetry/status", b"offline", 1, False),
    )
    device.close()
    watcher.no_message()
    watcher.close()


def test_disconnect_with_will_message_0x04_publishes_the_will(broker, pair):
    sensor, ops = pair
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 1)
    device = connected(broker, sensor, will=("devices/sensor-1/telemetry/status", b"bye", 0, True))
    device.client.disconnect(reasoncode=PahoReasonCode(mqtt.PacketTypes.DISCONNECT, identifier=4))
    device.client.loop_stop()
    will = watcher.message()
    assert will.payload == b"bye"
    watcher.close()
    late = connected(broker, ops)
    late.subscribe("devices/+/telemetry/#", 1)
    assert late.message().retain is True  # a retained will is retained
    late.close()


def test_will_topic_outside_the_acl_refuses_the_connect(broker, pair):
    sensor, _ = pair
    device = Paho(broker, sensor, will=("devices/sensor-2/telemetry/status", b"x", 0, False))
    assert device.connect()[0] == 135
    device.close()
    assert broker.metric("acl_denials_total", 'action="will"') == 1


def test_keep_alive_timeout_closes_with_0x8d_and_publishes_the_will(broker, pair):
    sensor, ops = pair
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 1)
    raw = RawClient(broker, sensor)
    from broker.mqtt import Will

    raw.connect(
        client_id="sensor-1",
        keep_alive=1,
        will=Will(topic="devices/sensor-1/telemetry/status", payload=b"silent"),
    )
    raw.send(PingReq())
    assert raw.receive() == PingResp()
    started = time.monotonic()
    goodbye = raw.receive(timeout=5)  # silent from now on
    waited = time.monotonic() - started
    assert isinstance(goodbye, Disconnect) and goodbye.reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    assert 1.5 <= waited <= 2.5  # 1.5 x keep-alive, checked every 0.5 s
    assert raw.receive() is None
    assert watcher.message().payload == b"silent"
    raw.close()
    watcher.close()


# -- sessions --------------------------------------------------------------------------------------


@BOTH
def test_persistent_session_resumes_with_the_qos1_messages_queued_while_away(broker, pair, version):
    sensor, ops = pair
    kwargs = {"clean": False, "version": version}
    if version == V5:
        kwargs["session_expiry"] = 600
    device = connected(broker, sensor, **kwargs)
    device.subscribe("devices/sensor-1/commands/#", 1)
    device.close()
    pub = connected(broker, ops)
    for n in range(3):
        pub.publish("devices/sensor-1/commands/q", f"m{n}".encode(), qos=1)
    pub.publish("devices/sensor-1/commands/q", b"qos0 is not queued", qos=0)
    assert broker.metric("messages_queued") == 3
    back = Paho(broker, sensor, **kwargs)
    code, present, _ = back.connect()
    assert (code, present) == (0, True)
    assert [back.message().payload for _ in range(3)] == [b"m0", b"m1", b"m2"]
    back.no_message(0.3)
    back.close()
    pub.close()


def test_clean_start_discards_the_previous_session(broker, pair):
    sensor, _ = pair
    device = connected(broker, sensor, session_expiry=600)
    device.subscribe("devices/sensor-1/commands/#", 1)
    device.close()
    fresh = Paho(broker, sensor, clean=True, session_expiry=600)
    assert fresh.connect()[1] is False
    fresh.close()


def test_session_expiry_0_ends_the_session_at_disconnect(broker, pair):
    sensor, _ = pair
    device = connected(broker, sensor, clean=False)
    device.subscribe("devices/sensor-1/commands/#", 1)
    device.close()
    assert broker.call(lambda: len(broker.broker.core.sessions)) == 0


def test_queued_messages_are_bounded_and_each_drop_counted(fleet, pair):
    sensor, ops = pair
    small = RunningBroker(fleet, max_queued_messages=2).start()
    try:
        device = connected(small, sensor, clean=False, session_expiry=600)
        device.subscribe("devices/sensor-1/commands/#", 1)
        device.close()
        pub = connected(small, ops)
        for n in range(5):
            pub.publish("devices/sensor-1/commands/q", f"m{n}".encode(), qos=1)
        assert small.metric("messages_dropped_total", 'reason="queue_full"') == 3
        back = connected(small, sensor, clean=False, session_expiry=600)
        assert [back.message().payload for _ in range(2)] == [b"m0", b"m1"]
        back.close()
        pub.close()
    finally:
        small.stop()


@BOTH
def test_second_connection_with_the_same_client_id_takes_the_session_over(broker, pair, version):
    sensor, _ = pair
    first = connected(broker, sensor, version=version)
    second = connected(broker, sensor, version=version)
    code, _ = first.disconnect_code(timeout=5)
    if version == V5:
        assert code == ReasonCode.SESSION_TAKEN_OVER
    else:
        assert code != 0  # 3.1.1 servers send no DISCONNECT: the connection just ends
    assert second.publish("devices/sensor-1/telemetry/t", b"1", qos=1) == 0
    second.close()
    first.close()


# -- MQTT 5 extras ---------------------------------------------------------------------------------


def test_subscription_identifiers_are_returned_with_matching_messages(broker, pair):
    sensor, ops = pair
    watcher = connected(broker, ops)
    props = PahoProperties(mqtt.PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    watcher.client.subscribe(
        "devices/+/telemetry/#", options=mqtt.SubscribeOptions(qos=1), properties=props
    )
    watcher.events.subacks.get(timeout=5)
    connected(broker, sensor).publish("devices/sensor-1/telemetry/t", b"1", qos=1)
    assert watcher.message().properties.SubscriptionIdentifier == [42]
    watcher.close()


def test_no_local_subscription_does_not_echo_own_messages(broker, fleet):
    fleet.registry.set_acl(
        "echo", publish=["devices/%d/#"], subscribe=["devices/%d/#"], actor="test"
    )
    device = connected(broker, enroll(fleet, "echo-1", group="echo"))
    device.subscribe("devices/echo-1/a", 1, noLocal=True)
    device.subscribe("devices/echo-1/b", 1)
    device.publish("devices/echo-1/a", b"not echoed", qos=1)
    device.publish("devices/echo-1/b", b"echoed", qos=1)
    assert device.message().payload == b"echoed"
    device.no_message(0.3)
    device.close()


def test_topic_alias_from_the_client_is_resolved(broker, pair):
    sensor, ops = pair
    watcher = connected(broker, ops)
    watcher.subscribe("devices/+/telemetry/#", 0)
    raw = RawClient(broker, sensor)
    connack = raw.connect(client_id="sensor-1")
    assert connack.properties.topic_alias_maximum == 64
    raw.send(
        Publish(
            topic="devices/sensor-1/telemetry/t", payload=b"1", properties=Properties(topic_alias=3)
        ),
        Publish(topic="", payload=b"2", properties=Properties(topic_alias=3)),
    )
    assert [watcher.message().topic for _ in range(2)] == ["devices/sensor-1/telemetry/t"] * 2
    raw.send(Publish(topic="", payload=b"3", properties=Properties(topic_alias=4)))
    goodbye = raw.receive()
    assert isinstance(goodbye, Disconnect) and goodbye.reason_code == ReasonCode.PROTOCOL_ERROR
    raw.close()
    watcher.close()


def test_packet_over_the_brokers_maximum_packet_size_ends_the_connection_with_0x95(broker, pair):
    raw = RawClient(broker, pair[0])
    raw.connect(client_id="sensor-1")
    big = encode(Publish(topic="devices/sensor-1/telemetry/big", payload=b"x" * 262144), 5)
    raw.sock.sendall(big[:64])  # the fixed header alone announces the size: refused from it
    goodbye = raw.receive()
    assert isinstance(goodbye, Disconnect) and goodbye.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert raw.receive() is None
    raw.close()


def test_connack_advertises_the_brokers_limits(broker, pair):
    raw = RawClient(broker, pair[0])
    connack = raw.connect(client_id="")
    assert isinstance(connack, ConnAck)
    assert connack.properties == Properties(
        assigned_client_identifier="sensor-1",
        receive_maximum=20,  # the group's [broker.limits] receive_maximum, not the ceiling 64
        topic_alias_maximum=64,
        maximum_packet_size=262144,
        shared_subscription_available=True,
    )
    raw.close()


def test_unsubscribe_stops_delivery(broker, pair):
    sensor, ops = pair
    device = connected(broker, sensor)
    device.subscribe("devices/sensor-1/commands/#", 1)
    device.client.unsubscribe("devices/sensor-1/commands/#")
    time.sleep(0.2)
    connected(broker, ops).publish("devices/sensor-1/commands/x", b"1", qos=1)
    device.no_message()
    device.close()
