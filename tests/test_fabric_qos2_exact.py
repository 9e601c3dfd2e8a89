"""QoS 2 stays exactly once across SIGKILL of a broker node (issue 12, the write-ahead of
broker.fabric.sessions): each outgoing QoS 2 PUBLISH and PUBREL, and each PUBREC for an
incoming QoS 2 PUBLISH, leaves the node only once the session record names its packet id
and stage, so the node that resumes the session agrees with what the client saw. Real
3-node nats-server cluster, a real broker node process killed with SIGKILL, raw MQTT 5
clients that keep their own session state and acknowledge only where the test says."""

# ruff: noqa: F811 - the tests take the `pair` and `cluster` fixtures imported below

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import nats
import pytest
from broker_helpers import V5, Creds, RawClient
from conftest import Fleet
from nats_cluster import NatsCluster
from test_broker_delivery import pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_node import FabricBroker
from test_fabric_sessions import (  # noqa: F401 (cluster: the module's 3-node cluster)
    TOPIC,
    ProcessNode,
    _forget_sessions,
    cluster,
    persistent,
    publish_all,
)

from broker.fabric.sessions import BUCKET
from broker.mqtt import (
    ConnAck,
    Packet,
    Properties,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS,
    SubAck,
    Subscribe,
    Subscription,
)

RESUMABLE = Properties(session_expiry_interval=300)


@pytest.fixture
def killable(fleet: Fleet, cluster: NatsCluster) -> Iterator[tuple[ProcessNode, FabricBroker]]:
    """Node K (a process, to be killed) on NATS server 1, node B (in process) on server 2."""
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()  # makes the server cert
    asyncio.run(_forget_sessions(cluster.nodes[0].url))
    victim = ProcessNode(fleet, [cluster.nodes[0].url], "node-k")
    try:
        victim.wait_listening()
        yield victim, b
    finally:
        if victim.process.poll() is None:
            victim.kill()
        b.stop()


def resume(broker: Any, creds: Creds) -> tuple[RawClient, ConnAck]:
    """A raw MQTT 5 connection of ``creds``'s client id to its persistent session."""
    raw = RawClient(broker, creds)
    connack = raw.connect(client_id=creds.device_id, clean_start=False, properties=RESUMABLE)
    assert connack.reason_code == 0
    return raw, connack


class QoS2Receiver:
    """A subscribing client's side of QoS 2, as MQTT asks of it: a message goes to the
    application at its first PUBLISH; the packet id is then held until PUBREL, and a PUBLISH
    under a held id is a resend (PUBREC again, not delivered). The held ids are the client's
    session state: they carry over to its next connection, on any node."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.delivered: list[bytes] = []

    def on_publish(self, packet: Publish) -> None:
        assert packet.qos == QoS.EXACTLY_ONCE and packet.packet_id is not None
        if packet.packet_id not in self.held:
            self.held.add(packet.packet_id)
            self.delivered.append(packet.payload)

    def serve(self, raw: RawClient, until: int, quiet_s: float = 2.0) -> None:
        """Complete every flow the broker starts, until ``until`` messages were delivered and
        then nothing came for ``quiet_s``."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                packet = raw.receive(quiet_s if len(self.delivered) >= until else 30)
            except (AssertionError, TimeoutError):  # quiet
                got = len(self.delivered)
                assert got >= until, f"{got} of {until} messages delivered, then silence"
                return
            if isinstance(packet, Publish):
                self.on_publish(packet)
                raw.send(PubRec(packet_id=packet.packet_id or 0))
            elif isinstance(packet, PubRel):
                self.held.discard(packet.packet_id)
                raw.send(PubComp(packet_id=packet.packet_id))
            else:
                raise AssertionError(f"unexpected {packet!r}")
        raise AssertionError("the broker kept sending")


def expect(raw: RawClient, kind: type[Packet], count: int) -> list[Any]:
    packets = [raw.receive() for _ in range(count)]
    assert all(isinstance(p, kind) for p in packets), packets
    return packets


def test_qos2_to_a_subscriber_is_exactly_once_across_sigkill_of_its_node(
    killable: tuple[ProcessNode, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    """ops-1 receives a stream of QoS 2 messages on node K: the first ten it completes, the
    next ten it takes up to PUBREL (its PUBCOMPs lost), the next ten it answers with PUBREC
    and node K is killed at once; ten more are published while K is dead. Resumed on node B,
    ops-1 hands each of the forty to its application once."""
    victim, b = killable
    sensor_creds, ops_creds = pair
    topic = f"{TOPIC}/exact{time.monotonic_ns()}"
    payloads = [f"q{i:02d}".encode() for i in range(40)]
    ops, _ = resume(victim, ops_creds)
    wanted = Subscription(topic_filter=topic, qos=QoS.EXACTLY_ONCE)
    ops.send(Subscribe(packet_id=1, subscriptions=(wanted,)))
    assert [int(c) for c in expect(ops, SubAck, 1)[0].reason_codes] == [2]
    publish_all(b, sensor_creds, payloads[:30], qos=2, topic=topic)
    receiver = QoS2Receiver()
    publishes: list[Publish] = expect(ops, Publish, 30)
    for packet in publishes:
        receiver.on_publish(packet)
    assert receiver.delivered == payloads[:30]
    ids = [p.packet_id or 0 for p in publishes]
    ops.send(*(PubRec(packet_id=i) for i in ids[:10]))
    for pubrel in expect(ops, PubRel, 10):
        receiver.held.discard(pubrel.packet_id)
        ops.send(PubComp(packet_id=pubrel.packet_id))
    ops.send(*(PubRec(packet_id=i) for i in ids[10:20]))
    for pubrel in expect(ops, PubRel, 10):  # and its PUBCOMPs are lost with node K
        receiver.held.discard(pubrel.packet_id)
    ops.send(*(PubRec(packet_id=i) for i in ids[20:]))
    victim.kill()  # right after those PUBRECs: no checkpoint since
    ops.close()
    publish_all(b, sensor_creds, payloads[30:], qos=2, topic=topic)
    again, connack = resume(b, ops_creds)
    assert connack.session_present
    receiver.serve(again, until=len(payloads))
    assert sorted(receiver.delivered) == payloads  # each once: none lost, none twice
    assert not receiver.held
    again.close()


def test_a_qos2_publish_resent_after_sigkill_of_its_node_is_published_once(
    killable: tuple[ProcessNode, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    """sensor-1 publishes QoS 2 on node K and gets PUBREC for five messages; a sixth it
    completes (PUBCOMP); node K is killed before any PUBREL of the five. Resumed on node B,
    sensor-1 sends the five again (DUP) and then PUBREL, and reuses the sixth's packet id
    for a new message: the subscriber gets each of the seven messages once."""
    victim, b = killable
    sensor_creds, ops_creds = pair
    topic = f"{TOPIC}/in{time.monotonic_ns()}"
    ops, _ = persistent(b, ops_creds, V5)
    assert ops.subscribe(topic, qos=2) == [2]
    sensor, _ = resume(victim, sensor_creds)
    first = [
        Publish(topic=topic, payload=f"m{i}".encode(), qos=QoS.EXACTLY_ONCE, packet_id=i)
        for i in range(1, 6)
    ]
    sensor.send(*first)
    assert [p.packet_id for p in expect(sensor, PubRec, 5)] == [1, 2, 3, 4, 5]
    done = Publish(topic=topic, payload=b"done", qos=QoS.EXACTLY_ONCE, packet_id=8)
    sensor.send(done)
    assert expect(sensor, PubRec, 1) == [PubRec(packet_id=8)]
    sensor.send(PubRel(packet_id=8))
    assert expect(sensor, PubComp, 1) == [PubComp(packet_id=8)]
    victim.kill()  # before the next checkpoint: the record may still list packet id 8
    sensor.close()
    again, connack = resume(b, sensor_creds)
    assert connack.session_present
    again.send(*(replace(p, dup=True) for p in first))
    assert [p.packet_id for p in expect(again, PubRec, 5)] == [1, 2, 3, 4, 5]
    again.send(*(PubRel(packet_id=i) for i in range(1, 6)))
    assert expect(again, PubComp, 5) == [PubComp(packet_id=i) for i in range(1, 6)]
    new = Publish(topic=topic, payload=b"new", qos=QoS.EXACTLY_ONCE, packet_id=8)
    again.send(new)  # DUP 0: a new message under a free id, not a resend
    assert expect(again, PubRec, 1) == [PubRec(packet_id=8)]
    again.send(PubRel(packet_id=8))
    assert expect(again, PubComp, 1) == [PubComp(packet_id=8)]
    got = sorted(ops.message(15).payload for _ in range(7))
    assert got == sorted([b"m1", b"m2", b"m3", b"m4", b"m5", b"done", b"new"])
    ops.no_message(2.0)
    again.close()
    ops.close()


def test_qos2_packets_wait_while_the_session_store_elects_a_leader_then_go_once(
    fleet: Fleet, cluster: NatsCluster, pair: tuple[Creds, Creds]
) -> None:
    """SIGKILL of the nats-server leading ``FG_SESSIONS``: the record writes fail or stall
    until a new leader is elected, the QoS 2 packets of the session wait meanwhile (its
    connection stays), and then every message reaches the subscriber once."""
    sensor_creds, ops_creds = pair
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    asyncio.run(_forget_sessions(cluster.nodes[0].url))
    topic = f"{TOPIC}/elect{time.monotonic_ns()}"
    payloads = [f"e{i}".encode() for i in range(10)]
    ops, _ = resume(b, ops_creds)
    wanted = Subscription(topic_filter=topic, qos=QoS.EXACTLY_ONCE)
    ops.send(Subscribe(packet_id=1, subscriptions=(wanted,)))
    expect(ops, SubAck, 1)
    leader = asyncio.run(_leader(cluster.nodes[1].url, "KV_" + BUCKET))
    (victim,) = [n for n in cluster.nodes if n.name == leader]
    sensor = RawClient(b, sensor_creds)
    assert sensor.connect(client_id="sensor-1").reason_code == 0
    try:
        cluster.kill(victim)
        sensor.send(
            *(
                Publish(topic=topic, payload=p, qos=QoS.EXACTLY_ONCE, packet_id=i + 1)
                for i, p in enumerate(payloads)
            )
        )
        receiver = QoS2Receiver()
        receiver.serve(ops, until=len(payloads))
        assert sorted(receiver.delivered) == payloads
        assert not receiver.held
        sensor.close()
        ops.close()
    finally:
        cluster.restart(victim)
        b.stop()


async def _leader(url: str, stream: str) -> str:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(stream)
    await nc.close()
    return str(info.cluster.leader)  # type: ignore[union-attr]
