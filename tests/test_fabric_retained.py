"""Retained messages in the fabric (issue 12): set on one node, seen by subscribers on another
(also when set after that node started), deleted everywhere by an empty payload, kept through
a restart of every broker node, counted against one cluster-wide quota, expired on time. Real
3-node nats-server cluster, real broker nodes, real paho clients."""

# ruff: noqa: F811 - the tests take fixtures imported from other test modules

from __future__ import annotations

import time

from broker_helpers import Creds, enroll, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from test_broker_delivery import connected, pair  # noqa: F401 (sensor-1, ops-1)
from test_fabric_node import FabricBroker, cluster, nodes  # noqa: F401

from broker.limits import DeviceLimits, LimitSettings

QUOTA_EXCEEDED = 0x97


def _topic(name: str) -> str:
    """A topic no other test of this module uses (the stream outlives each test's nodes)."""
    return f"devices/sensor-1/telemetry/{name}-{time.monotonic_ns()}"


def _holds(node: FabricBroker, topic: str) -> list[bytes]:
    """The payloads ``node``'s retained set has for ``topic``."""
    return node.call(lambda: [m.payload for m in node.broker.core.retained.matching(topic)])


def test_a_retained_message_set_on_one_node_reaches_a_subscriber_on_another(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    """Node B started before the message was set: its copy follows the stream."""
    a, b = nodes
    sensor_creds, ops_creds = pair
    topic = _topic("status")
    sensor = connected(a, sensor_creds)
    assert sensor.publish(topic, b"online", qos=1, retain=True) == 0
    wait_for(lambda: _holds(b, topic) == [b"online"], what="node B's copy")
    ops = connected(b, ops_creds)
    assert ops.subscribe(topic, qos=1) == [1]
    got = ops.message()
    assert (got.topic, got.payload, got.retain, got.qos) == (topic, b"online", True, 1)
    # Replaced on A, seen on B; an empty payload on B deletes it on A too.
    assert sensor.publish(topic, b"offline", qos=1, retain=True) == 0
    wait_for(lambda: _holds(b, topic) == [b"offline"], what="the replacement on node B")
    sensor.close()
    ops.close()
    sensor_b = connected(b, sensor_creds)
    assert sensor_b.publish(topic, b"", qos=1, retain=True) == 0
    wait_for(lambda: _holds(a, topic) == [], what="the deletion on node A")
    sensor_b.close()
    late = connected(a, ops_creds)
    assert late.subscribe(topic) == [0]
    late.no_message()
    late.close()
    assert a.metric("fabric_retained_stored_total", 'node="node-a"') >= 1
    assert a.metric("fabric_retained_applied_total", 'node="node-a"') >= 3


def test_retained_messages_survive_a_restart_of_every_broker_node(
    fleet: Fleet, cluster: NatsCluster, pair: tuple[Creds, Creds]
) -> None:
    sensor_creds, ops_creds = pair
    topic = _topic("kept")
    a = FabricBroker(fleet, [cluster.nodes[0].url], "node-a").start()
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    sensor = connected(a, sensor_creds)
    assert sensor.publish(topic, b"v1", qos=0, retain=True) == 0
    sensor.close()
    a.stop()  # a clean stop writes what it still has queued
    b.stop()
    a = FabricBroker(fleet, [cluster.nodes[2].url], "node-a").start()
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    try:
        assert _holds(a, topic) == [b"v1"]  # loaded before the listener opened
        ops = connected(b, ops_creds)
        assert ops.subscribe(topic) == [0]
        got = ops.message()
        assert (got.topic, got.payload, got.retain) == (topic, b"v1", True)
        ops.close()
    finally:
        a.stop()
        b.stop()


def test_the_retained_quota_counts_a_device_across_nodes(
    fleet: Fleet, cluster: NatsCluster
) -> None:
    """One retained message per device: set on node A, a second one on node B is refused."""
    limits = LimitSettings(default=DeviceLimits(max_retained_messages=1))
    a = FabricBroker(fleet, [cluster.nodes[0].url], "node-a", limits=limits).start()
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b", limits=limits).start()
    device_id = f"quota-{time.monotonic_ns() % 10**9}"
    creds = enroll(fleet, device_id)
    try:
        first = connected(a, creds)
        assert first.publish(f"devices/{device_id}/telemetry/a", b"1", qos=1, retain=True) == 0
        first.close()
        wait_for(lambda: b.call(lambda: b.broker.core.retained.held(device_id))[0] == 1)
        second = connected(b, creds)
        code = second.publish(f"devices/{device_id}/telemetry/b", b"2", qos=1, retain=True)
        assert code == QUOTA_EXCEEDED
        # Replacing its own message is no new one: allowed on either node.
        assert second.publish(f"devices/{device_id}/telemetry/a", b"3", qos=1, retain=True) == 0
        second.close()
    finally:
        a.stop()
        b.stop()


def test_an_expired_retained_message_is_not_delivered_on_another_node(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    topic = _topic("short")
    sensor = connected(a, sensor_creds)
    props = PahoProperties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 1
    info = sensor.client.publish(topic, b"brief", qos=1, retain=True, properties=props)
    assert sensor.events.published.get(timeout=10) == (info.mid, 0)
    wait_for(lambda: _holds(b, topic) == [b"brief"], what="node B's copy")
    time.sleep(1.2)  # the expiry itself is what is tested
    ops = connected(b, ops_creds)
    assert ops.subscribe(topic) == [0]
    ops.no_message()
    # A node started now does not load it at all.
    c = FabricBroker(a.fleet, [cluster.nodes[2].url], "node-c").start()
    try:
        assert _holds(c, topic) == []
    finally:
        c.stop()
    sensor.close()
    ops.close()
