"""The fabric failing under running broker nodes (issue 12). SIGKILL of the stream leader's
nats-server under QoS 1/2 load: nothing acknowledged is lost, nothing delivered twice to a
persistent QoS 2 subscriber on another node. Every nats-server stopped, then
started again. QoS 1/2 publishes are refused at once while it stays down (0x97 on MQTT 5, a
close without PUBACK on 3.1.1), with one log line per state change and /metrics, and taken
again once the stream answers. QoS 1 messages in flight through the election reach a
persistent subscriber in the order published. The down/up decision itself is tested without
I/O."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from broker_helpers import V5, V311, Creds, Paho, enroll, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster, NatsNode
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_node import FabricBroker
from test_fabric_sessions import cluster  # noqa: F401 (one healthy cluster per module)

from broker.fabric.durable import STREAM, Availability


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_stall_only_holds_and_a_lasting_outage_turns_the_fabric_down() -> None:
    state = Availability(link_grace_s=2.0, stall_s=12.0)
    assert not state.check(True, 0.0, 5.0)  # an election: the oldest message waits 5 s
    assert state.answered(5.5) is False  # the stream answered; nothing changed
    assert not state.check(True, 0.0, 17.0)  # waiting since 0, but answers came at 5.5
    assert state.check(True, 0.0, 17.5) and state.down  # 12 s without an answer
    assert "FG_MSGS has not answered for 12 s" in state.reason
    assert not state.check(True, 0.0, 18.0)  # already down: no second change
    assert state.answered(19.0) and not state.down and state.changes == 2
    assert not state.check(False, None, 20.0)  # the link just dropped: nats-py tries others
    assert not state.check(False, None, 21.9)
    assert state.check(False, None, 22.0)
    assert state.reason == "the NATS link has been down for 2 s"
    assert state.answered(30.0) and not state.check(True, None, 40.0)


async def _stream_leader(url: str) -> str:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(STREAM)
    await nc.close()
    assert info.cluster is not None
    return str(info.cluster.leader)


@dataclass
class Election:
    """Node A with sensor-1 connected, node B with ops-1 in a persistent session subscribed to
    all telemetry, and the nats-server leading FG_MSGS, for the test to kill."""

    a: FabricBroker
    sensor: Paho
    ops: Paho
    topic: str
    victim: NatsNode


@contextlib.contextmanager
def election(
    fleet: Fleet, cluster: NatsCluster, pair: tuple[Creds, Creds], qos: int
) -> Iterator[Election]:
    """The set-up of a stream leader killed under load; the victim is started again after."""
    sensor_creds, ops_creds = pair
    a = FabricBroker(fleet, cluster.urls, "node-a").start()
    b = FabricBroker(fleet, cluster.urls, "node-b").start()
    victim = None
    try:
        ops = Paho(b, ops_creds, version=V5, clean=False, session_expiry=300)
        assert ops.connect()[0] == 0
        assert ops.subscribe("devices/+/telemetry/#", qos=qos) == [qos]
        sensor = connected(a, sensor_creds, version=V5)
        (victim,) = [
            n for n in cluster.nodes if n.name == asyncio.run(_stream_leader(cluster.urls[0]))
        ]
        topic = f"devices/sensor-1/telemetry/leader{time.monotonic_ns()}"
        yield Election(a, sensor, ops, topic, victim)
        sensor.close()
        ops.close()
    finally:
        a.stop()
        b.stop()
        if victim is not None:
            cluster.restart(victim)


def test_a_killed_stream_leader_loses_nothing_and_a_qos_2_subscriber_gets_each_once(
    fleet: Fleet, cluster: NatsCluster, pair: tuple[Creds, Creds]
) -> None:
    """A device on node A publishes QoS 1 and 2 alternately, each waiting for its
    acknowledgement; a persistent session on node B subscribes at QoS 2; the FG_MSGS leader's
    nats-server is killed with SIGKILL mid-stream. Every acknowledged message reaches the
    subscriber, and none twice (the resends reuse their Nats-Msg-Id; the session reads the
    stream)."""
    with election(fleet, cluster, pair, qos=2) as e:
        sensor, ops, topic = e.sensor, e.ops, e.topic
        acked: list[tuple[float, bytes]] = []
        stop = threading.Event()

        def publish() -> None:
            for index in itertools.count():
                if stop.is_set():
                    return
                payload = f"{index:05d}".encode()
                assert sensor.publish(topic, payload, qos=1 + index % 2) == 0
                acked.append((time.monotonic(), payload))

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        try:
            wait_for(lambda: len(acked) >= 50, 15, "50 acknowledged")
            killed_at = time.monotonic()
            cluster.kill(e.victim)
            wait_for(lambda: sum(t > killed_at for t, _ in acked) >= 50, 30, "50 more")
        finally:
            stop.set()
            publisher.join(30)
        times = [t for t, _ in acked]
        gap = max(later - earlier for earlier, later in itertools.pairwise(times))
        print(f"acked {len(acked)}, longest acknowledgement gap {gap:.2f} s after the kill")
        sent = {p for _, p in acked}
        received: list[Any] = []
        deadline = time.monotonic() + 30
        while not {m.payload for m in received} >= sent and time.monotonic() < deadline:
            try:
                received.append(ops.message(1))
            except Exception:
                continue
        ops.no_message(1.0)  # nothing more: no late duplicate either
        payloads = [m.payload for m in received if m.topic == topic]
        assert set(payloads) >= sent  # none lost
        assert len(payloads) == len(set(payloads))  # none twice, QoS 1 or 2
        assert e.a.metric("fabric_available", 'node="node-a"') == 1  # a stall, not down


def test_qos_1_messages_in_flight_through_a_leader_election_arrive_in_order(
    fleet: Fleet, cluster: NatsCluster, pair: tuple[Creds, Creds]
) -> None:
    """A device on node A publishes QoS 1 without waiting for acknowledgements (its receive
    maximum in flight, sent over several of the node's resend ticks) while the FG_MSGS
    leader's nats-server is killed; a persistent session on node B gets every message in
    the order published (MQTT 5 §4.6). Resent one per tick, the messages of the election's
    last tick came back stored before earlier ones (issue 12); the ledger's hold keeps them
    behind the oldest (DurableLedger.due)."""
    with election(fleet, cluster, pair, qos=1) as e:
        payloads = [f"{index:05d}".encode() for index in range(150)]
        published = threading.Event()

        def publish() -> None:
            for payload in payloads:
                e.sensor.client.publish(e.topic, payload, qos=1)  # paho queues past 20 in flight
                published.wait(0.02)  # a device's pace: spread over the node's ticks
            published.set()

        acks: list[tuple[int, int]] = []

        def acked(count: int) -> bool:
            while not e.sensor.events.published.empty():
                acks.append(e.sensor.events.published.get())
            return len(acks) >= count

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        try:
            wait_for(lambda: acked(30), 15, "30 acknowledged")
            cluster.kill(e.victim)
            wait_for(lambda: acked(len(payloads)), 60, "every message acknowledged")
        finally:
            published.set()
            publisher.join(30)
        assert {code for _, code in acks} == {0}
        assert e.a.metric("fabric_resent_total", 'node="node-a"') > 0  # the election was felt
        received: list[bytes] = []
        while len(set(received)) < len(payloads):
            message = e.ops.message(30)
            if message.topic == e.topic:
                received.append(message.payload)
        firsts = list(dict.fromkeys(received))  # a QoS 1 redelivery may repeat one
        assert firsts == payloads, [
            (earlier, later) for earlier, later in itertools.pairwise(firsts) if later < earlier
        ]


def test_a_fabric_that_stays_down_refuses_qos_1_at_once_and_recovers(
    fleet: Fleet,
    cluster: NatsCluster,
    pair: tuple[Creds, Creds],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fleetgate")
    sensor_creds, _ = pair
    other_creds = enroll(fleet, "sensor-2")
    node = FabricBroker(fleet, cluster.urls, "node-a").start()
    label = 'node="node-a"'
    try:
        v5 = connected(node, sensor_creds, version=V5)
        v3 = connected(node, other_creds, version=V311)
        assert v5.publish("devices/sensor-1/telemetry/t", b"before", qos=1) == 0
        assert node.metric("fabric_available", label) == 1

        for server in cluster.nodes:
            cluster.kill(server, signal.SIGTERM)
        wait_for(lambda: node.metric("fabric_available", label) == 0, 15, "the fabric down")
        assert v5.publish("devices/sensor-1/telemetry/t", b"down", qos=1) == 0x97
        v3.client.publish("devices/sensor-2/telemetry/t", b"down", qos=1)
        code, _ = v3.disconnect_code()
        assert code != 0  # closed without PUBACK: the client keeps the message
        assert v3.events.published.empty()
        assert node.metric("fabric_refused_total", label) == 2
        assert node.metric("fabric_connected", label) == 0

        for server in cluster.nodes:
            cluster.start_node(server)
        cluster.wait_healthy(cluster.nodes)
        wait_for(lambda: node.metric("fabric_available", label) == 1, 30, "the fabric back")
        assert v5.publish("devices/sensor-1/telemetry/t", b"after", qos=1) == 0
        v3 = connected(node, other_creds, version=V311)
        assert v3.publish("devices/sensor-2/telemetry/t", b"after", qos=1) == 0
        assert node.metric("fabric_state_changes_total", label) == 2
        assert node.metric("fabric_connected", label) == 1
        v5.close()
        v3.close()
    finally:
        node.stop()
    down = _lines(caplog, "fabric down:")
    assert len(down) == 1 and "the NATS link has been down" in down[0], down
    assert len(_lines(caplog, "fabric available again")) == 1
    assert len(_lines(caplog, "fabric disconnected")) >= 1
