"""What a device may touch: its own topics, by its group's template, and nothing else.

A sensor in the default group publishes under ``devices/<id>/`` and subscribes to its own
commands; a controller in the ``controllers`` group (template stored in the registry) reads all
telemetry and sends commands. Everything else is refused with the code of the client's version,
audited, and counted.
"""

from __future__ import annotations

import asyncio

import pytest
from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_1
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Creds,
    MosquittoSub,
    Paho,
    RunningBroker,
    enroll,
    mosquitto,
    running_broker,  # noqa: F401
    wait_for,
)


@pytest.fixture
def devices(fleet):
    """sensor-1 and sensor-2 (default group) and ops-1 (controllers)."""
    fleet.registry.set_acl(
        "controllers",
        publish=["devices/+/commands/#"],
        subscribe=["devices/+/telemetry/#"],
        actor="test",
    )
    return (
        enroll(fleet, "sensor-1"),
        enroll(fleet, "sensor-2"),
        enroll(fleet, "ops-1", group="controllers"),
    )


def acl_refusal_audited(broker: RunningBroker, device: str, action: str, topic: str) -> None:
    def found() -> bool:
        events = broker.audit_events(device, action=f"mqtt.{action}", outcome="refused")
        return any(repr(topic) in e.reason for e in events)

    wait_for(found, what=f"audited {action} refusal of {topic}")


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_telemetry_and_commands_on_own_topics_flow_between_mosquitto_clients(
    broker, devices, version
):
    sensor, _, ops = devices
    steps = [  # (subscriber, filter, publisher, topic): one connection per device at a time
        (ops, "devices/+/telemetry/#", sensor, "devices/sensor-1/telemetry/temp"),
        (sensor, "devices/sensor-1/commands/#", ops, "devices/sensor-1/commands/reboot"),
    ]
    for subscriber, topic_filter, publisher, topic in steps:
        sub = MosquittoSub(
            broker, subscriber, "-t", topic_filter, "-C", "1", "-v", "-q", "1", version=version
        )
        try:
            sub.wait_line(lambda line: line == "Subscribed (mid: 1): 1")
            published = mosquitto(
                "mosquitto_pub",
                broker,
                publisher,
                "-t",
                topic,
                "-m",
                "21.5",
                "-q",
                "1",
                version=version,
            )
            assert published.returncode == 0, published.stdout
            assert "received PUBACK (Mid: 1, RC:0)" in published.stdout
            sub.wait_line(lambda line, topic=topic: line == f"{topic} 21.5")
        finally:
            sub.stop()


@pytest.mark.parametrize(("version", "code"), [("mqttv311", 128), ("mqttv5", 135)])
def test_subscribing_to_another_devices_commands_is_refused_in_suback(
    broker, devices, version, code
):
    sensor = devices[0]
    result = mosquitto(
        "mosquitto_sub",
        broker,
        sensor,
        "-t",
        "devices/sensor-2/commands/#",
        "-W",
        "2",
        version=version,
    )
    assert f"Subscribed (mid: 1): {code}" in result.stdout
    acl_refusal_audited(broker, "sensor-1", "subscribe", "devices/sensor-2/commands/#")
    assert broker.metric("acl_denials_total", 'action="subscribe"') == 1


def test_a_filter_overlapping_other_devices_is_refused_even_if_it_covers_own_topics(
    broker, devices
):
    client = Paho(broker, devices[0], version=V5)
    client.connect()
    assert client.subscribe("devices/+/commands/#", 1) == [135]
    assert client.subscribe("devices/sensor-1/commands/#", 1) == [1]
    client.close()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_publishing_to_another_devices_topic_is_dropped_on_311_and_refused_0x87_on_5(
    broker, devices, version
):
    sensor, _, ops = devices
    watcher = Paho(broker, ops, version=V5)
    watcher.connect()
    watcher.subscribe("devices/+/telemetry/#", 1)
    result = mosquitto(
        "mosquitto_pub",
        broker,
        sensor,
        "-t",
        "devices/sensor-2/telemetry/temp",
        "-m",
        "-5",
        "-q",
        "1",
        version=version,
    )
    rc = 0 if version == "mqttv311" else 135  # 3.1.1 cannot say no: acked, then dropped
    assert f"received PUBACK (Mid: 1, RC:{rc})" in result.stdout
    watcher.no_message()
    watcher.close()
    acl_refusal_audited(broker, "sensor-1", "publish", "devices/sensor-2/telemetry/temp")


def test_qos2_publish_outside_the_acl_is_refused_in_pubrec_on_5(broker, devices):
    result = mosquitto(
        "mosquitto_pub",
        broker,
        devices[0],
        "-t",
        "devices/sensor-2/telemetry/x",
        "-m",
        "1",
        "-q",
        "2",
    )
    assert "received PUBREC (Mid: 1)" in result.stdout
    assert "Publish 1 failed: Not authorized" in result.stderr  # mosquitto's words for 0x87
    # paho ignores a refusing PUBREC and sends PUBREL anyway; the flow is over, so the broker
    # answers PUBCOMP "packet identifier not found" (0x92), as MQTT 5 section 4.3.3 says.
    client = Paho(broker, devices[0], version=V5)
    client.connect()
    assert client.publish("devices/sensor-2/telemetry/x", b"1", qos=2) == 0x92
    assert client.publish("devices/sensor-1/telemetry/x", b"1", qos=2) == 0
    client.close()


def test_qos2_publish_outside_the_acl_completes_as_if_delivered_on_311(broker, devices):
    client = Paho(broker, devices[0], version=V311)
    client.connect()
    assert client.publish("devices/sensor-2/telemetry/x", b"1", qos=2) == 0
    client.close()


def test_sys_topics_are_denied_even_when_a_group_template_grants_everything(fleet, broker):
    fleet.registry.set_acl("wide", publish=["#"], subscribe=["#"], actor="test")
    creds = enroll(fleet, "wide-1", group="wide")
    client = Paho(broker, creds, version=V5)
    client.connect()
    assert client.subscribe("$SYS/#", 0) == [135]
    assert client.subscribe("$SYS/broker/uptime", 0) == [135]
    assert client.publish("$SYS/broker/fake", b"x", qos=1) == 135
    assert client.subscribe("#", 0) == [0]
    client.close()
    acl_refusal_audited(broker, "wide-1", "subscribe", "$SYS/#")


def test_amqtt_client_uses_its_own_topics_and_is_refused_others(broker, devices):
    sensor = devices[0]
    assert asyncio.run(amqtt_round_trip(broker, sensor)) == ([0x80, 1], b"on")
    acl_refusal_audited(broker, "sensor-1", "subscribe", "devices/sensor-2/commands/#")


async def amqtt_round_trip(broker: RunningBroker, creds: Creds) -> tuple[list[int], bytes]:
    client = MQTTClient(
        client_id=creds.device_id,
        config={
            "auto_reconnect": False,
            "connection": {"certfile": str(creds.cert), "keyfile": str(creds.key)},
        },
    )
    await client.connect(f"mqtts://localhost:{broker.port}/", cafile=str(broker.fleet.root))
    try:
        codes = await client.subscribe(
            [("devices/sensor-2/commands/#", QOS_1), ("devices/sensor-1/commands/#", QOS_1)]
        )
        await client.publish("devices/sensor-2/commands/x", b"denied", qos=QOS_1)
        await client.publish("devices/sensor-1/commands/light", b"on", qos=QOS_1)
        message = await client.deliver_message(timeout_duration=10)
        assert message is not None
        return list(codes), bytes(message.data or b"")
    finally:
        await client.disconnect()


def test_paho_311_subscription_outside_the_acl_gets_0x80(broker, devices):
    client = Paho(broker, devices[0], version=V311)
    client.connect()
    assert client.subscribe("devices/sensor-2/commands/#", 1) == [128]
    client.close()
