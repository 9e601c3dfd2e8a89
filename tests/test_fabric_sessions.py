"""Persistent sessions in the fabric (issue 12): a session made on one broker node resumes on
another with its subscriptions and everything queued for it, a node killed with SIGKILL loses
none of its sessions' messages, a client id connecting on another node takes the session over
(0x8E), expired sessions are gone. Real 3-node nats-server cluster, real broker nodes (in
process, and one as a subprocess to be killed), real paho clients, MQTT 3.1.1 and 5."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from broker_helpers import V5, V311, Creds, Paho, free_port, wait_for
from conftest import PASSPHRASE, Fleet
from nats_cluster import NatsCluster, healthy_cluster
from test_broker_delivery import pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_node import FabricBroker

from broker.fabric.records import FilterState, SessionRecord, client_id_of, record_key
from broker.fabric.sessions import BUCKET, SINCE_MARGIN_S
from broker.session import NEVER_EXPIRES

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "devices/sensor-1/telemetry/s"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with healthy_cluster(tmp_path_factory.mktemp("nats")) as running:
        yield running


@pytest.fixture
def nodes(fleet: Fleet, cluster: NatsCluster) -> Iterator[tuple[FabricBroker, FabricBroker]]:
    a = FabricBroker(fleet, [cluster.nodes[0].url], "node-a").start()
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    asyncio.run(_forget_sessions(cluster.nodes[0].url))  # the previous test's, same client ids
    yield a, b
    a.stop()
    b.stop()


class MovingPaho(Paho):
    """A device that keeps its own session state (the QoS 2 ids it holds) when it connects
    again, to another node: one paho client object, connected again elsewhere."""

    def reconnect_to(self, broker: Any) -> bool:
        self._broker = broker
        code, present, _ = self.connect()
        assert code == 0
        return present


def persistent(broker: Any, creds: Creds, version: int, **kwargs: Any) -> tuple[Paho, bool]:
    """A client with a persistent session (3.1.1 clean session 0, 5.0 expiry 300 s)."""
    client = Paho(broker, creds, version=version, clean=False, session_expiry=300, **kwargs)
    code, present, _ = client.connect()
    assert code == 0
    return client, present


def publish_all(
    broker: Any, creds: Creds, payloads: list[bytes], qos: int = 1, topic: str = TOPIC
) -> None:
    sender = Paho(broker, creds)
    assert sender.connect()[0] == 0
    for payload in payloads:
        assert sender.publish(topic, payload, qos=qos) == 0
    sender.close()


def listening(node: Any, other: Any, pair: tuple[Creds, Creds], payload: bytes) -> Paho:
    """ops-1 in a persistent MQTT 5 session on ``node``, subscribed to all telemetry at QoS 1,
    once a message from sensor-1 on ``other`` has reached it."""
    sensor_creds, ops_creds = pair
    client, _ = persistent(node, ops_creds, V5)
    assert client.subscribe("devices/+/telemetry/#", qos=1) == [1]
    publish_all(other, sensor_creds, [payload])
    assert client.message(15).payload == payload
    return client


def receive(client: Paho, count: int) -> list[Any]:
    return [client.message(15) for _ in range(count)]


async def _record(url: str, key: str) -> SessionRecord | None:
    nc = await nats.connect(url)
    kv = await nc.jetstream().key_value(BUCKET)
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    finally:
        await nc.close()
    return SessionRecord.decode(entry.value or b"")


async def _forget_sessions(url: str) -> None:
    """A clean slate: no session records, and no earlier test's messages within a new
    filter's margin (SINCE_MARGIN_S)."""
    nc = await nats.connect(url)
    await nc.jetstream().purge_stream("KV_" + BUCKET)
    await nc.close()
    await asyncio.sleep(SINCE_MARGIN_S)


def record_of(cluster: NatsCluster, client_id: str) -> SessionRecord | None:
    return asyncio.run(_record(cluster.nodes[2].url, record_key(client_id)))


# -- the record, pure ---------------------------------------------------------------------------


def test_the_record_round_trips_and_knows_when_it_expired() -> None:
    record = SessionRecord(
        "ops-1",
        "node-a",
        60,
        away_since=1000.0,
        subs={"a/#": FilterState(1, True, False, 7, 999.5, 42)},
        inflight=[(3, 41, "a/#", 2)],
        qos2_in=[9],
    )
    back = SessionRecord.decode(record.encode())
    assert back == record
    assert not record.expired(1059.0) and record.expired(1060.0)
    assert not SessionRecord("d", "n", NEVER_EXPIRES, away_since=0.0).expired(1e12)
    assert not SessionRecord("d", "n", 60).expired(1e12)  # connected
    assert SessionRecord.decode(b'{"v": 2}') is None
    assert len(record.encode()) < 300


def test_record_keys_take_any_client_id() -> None:
    assert record_key("sensor-1") == "c.sensor-1"
    assert record_key("a.b_c") == "c.a.b_c"
    assert record_key("with space") == "h." + b"with space".hex()
    assert record_key("a..b") != record_key("a.b")
    for client_id in ("sensor-1", "a.b_c", "with space", "a..b", "ü"):
        assert client_id_of(record_key(client_id)) == client_id


# -- across live nodes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V311, V5])
def test_a_session_made_on_one_node_resumes_on_another_with_its_queue(
    nodes: tuple[FabricBroker, FabricBroker],
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
    version: int,
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops, present = persistent(a, ops_creds, version)
    assert not present
    assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
    ops.close()
    wait_for(lambda: (r := record_of(cluster, "ops-1")) and r.away_since, what="record away")
    payloads = [f"m{i}".encode() for i in range(20)]
    publish_all(a, sensor_creds, payloads)  # stored in FG_MSGS while ops is away
    again, present = persistent(b, ops_creds, version)
    assert present
    got = receive(again, len(payloads))
    assert [m.payload for m in got] == payloads
    assert {m.qos for m in got} == {1}
    again.no_message()
    record = record_of(cluster, "ops-1")
    assert record is not None and record.node == "node-b" and record.away_since is None
    assert b.metric("fabric_sessions_resumed_total", 'node="node-b"') == 1
    assert b.metric("fabric_sessions_fed", 'node="node-b"') == 1
    again.close()


def test_takeover_across_nodes_closes_the_old_connection_with_0x8e_and_loses_nothing(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    first = listening(a, b, pair, b"before")
    started = time.monotonic()
    second, present = persistent(b, ops_creds, V5)
    took = time.monotonic() - started
    assert present
    code, _ = first.disconnect_code()
    assert code == 0x8E
    print(f"takeover across nodes: CONNACK after {took * 1000:.1f} ms")
    publish_all(a, sensor_creds, [b"after-1", b"after-2"])
    assert [m.payload for m in receive(second, 2)] == [b"after-1", b"after-2"]
    second.no_message()
    assert a.call(lambda: a.broker.fabric.sessions.taken_over) == 1
    first.client.loop_stop()
    second.close()


def test_resume_under_load_loses_nothing_keeps_order_and_does_not_duplicate_qos_2(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], fleet: Fleet
) -> None:
    """A publisher on node A sends QoS 1 and QoS 2 without pause while the subscriber
    disconnects from node A and resumes on node B, twice."""
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = MovingPaho(a, ops_creds, version=V5, clean=False, session_expiry=300)
    assert ops.connect()[0] == 0
    assert ops.subscribe("devices/+/telemetry/#", qos=2) == [2]
    sender = Paho(a, sensor_creds)
    assert sender.connect()[0] == 0
    sent: list[bytes] = []
    stop = threading.Event()
    topic = f"{TOPIC}/load{time.monotonic_ns()}"  # earlier tests' messages are on others

    def publish() -> None:
        index = 0
        while not stop.is_set() and index < 400:
            payload = f"{index:05d}".encode()
            assert sender.publish(topic, payload, qos=1 + index % 2) == 0
            sent.append(payload)
            index += 1

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    received: list[Any] = []
    try:
        for target in (b, a):
            wait_for(lambda: len(sent) > len(received) + 30, what="traffic")
            while not ops.events.messages.empty():
                received.append(ops.events.messages.get())
            ops.close()
            while not ops.events.messages.empty():
                received.append(ops.events.messages.get())
            assert ops.reconnect_to(target)
    finally:
        publisher.join(60)
        stop.set()
    assert len(sent) == 400
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            received.append(ops.message(2))
        except Exception:
            if {m.payload for m in received} >= set(sent):
                break
    received = [m for m in received if m.topic == topic]
    payloads = [m.payload for m in received]
    assert set(payloads) == set(sent)  # none lost
    qos2 = [p for p, m in zip(payloads, received, strict=True) if m.qos == 2]
    assert len(qos2) == len(set(qos2))  # no QoS 2 twice
    # Order per topic and QoS (paho hands a QoS 2 message on at PUBREL, a QoS 1 one at
    # once): each message's first arrival comes after every earlier one's.
    for qos in (1, 2):
        first_seen = list(dict.fromkeys(m.payload for m in received if m.qos == qos))
        assert first_seen == sorted(first_seen)
    ops.close()
    sender.close()


def test_a_session_expires_and_its_record_is_removed(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    a, b = nodes
    _, ops_creds = pair
    ops = Paho(a, ops_creds, version=V5, clean=False, session_expiry=1)
    assert ops.connect()[0] == 0
    assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
    ops.close()
    assert record_of(cluster, "ops-1") is not None
    # Node A ends it at expiry (its tick) and deletes the record.
    wait_for(lambda: record_of(cluster, "ops-1") is None, timeout=10, what="record deleted")
    again = Paho(b, ops_creds, version=V5, clean=False, session_expiry=1)
    code, present, _ = again.connect()
    assert (code, present) == (0, False)
    again.close()


def test_takeover_of_a_clean_session_across_nodes(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    """A session without a record (clean, no expiry) is taken over too: the new node
    announces the client id, the old one closes with 0x8E."""
    a, b = nodes
    _, ops_creds = pair
    first = Paho(a, ops_creds, version=V5)
    assert first.connect()[0] == 0
    second = Paho(b, ops_creds, version=V5)
    code, present, _ = second.connect()
    assert (code, present) == (0, False)
    assert first.disconnect_code()[0] == 0x8E
    first.client.loop_stop()
    second.close()


def test_a_consumer_lost_with_its_nats_server_is_started_again(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    """The session's consumer is R1 on one nats-server: SIGKILL of that server loses it, and
    the node starts it again after the last sequence it handed on (missing heartbeats): the
    messages published meanwhile all arrive, once each, in order."""
    a, b = nodes
    sensor_creds, _ = pair
    ops = listening(b, a, pair, b"first")

    def consumers() -> list[str]:
        feeds = b.broker.fabric.sessions._feeds
        return [f.consumer for feed in feeds for f in feed.filters.values()]

    (consumer,) = b.call(consumers)

    async def host() -> str:
        nc = await nats.connect(cluster.nodes[0].url)
        info = await nc.jetstream().consumer_info("FG_MSGS", consumer)
        await nc.close()
        return str(info.cluster.leader)  # type: ignore[union-attr]

    (victim,) = [n for n in cluster.nodes if n.name == asyncio.run(host())]
    cluster.kill(victim)
    try:
        sensor = Paho(a, sensor_creds)
        sensor.start()  # its CONNACK waits while FG_SESSIONS elects a leader
        assert sensor.events.connack.get(timeout=30)[0] == 0
        payloads = [f"x{i}".encode() for i in range(10)]
        for payload in payloads:  # not waiting: PUBACKs pause while FG_MSGS elects a leader
            sensor.client.publish(TOPIC, payload, qos=1)
        got = [ops.message(40).payload for _ in payloads]
        assert got == payloads
        ops.no_message()
        sensor.close()
        ops.close()
    finally:
        cluster.restart(victim)


# -- a node killed with SIGKILL ------------------------------------------------------------------


class ProcessNode:
    """``fleetgate serve broker`` as a node of the fabric, in its own process, to be killed."""

    def __init__(self, fleet: Fleet, servers: list[str], name: str, metrics_port: int = 0) -> None:
        self.fleet = fleet
        self.port = free_port()
        self.metrics_port = metrics_port
        env = dict(os.environ)
        env.update(
            FLEETGATE_HOME=str(fleet.config.home),
            FLEETGATE_CA_PASSPHRASE=PASSPHRASE,
            FLEETGATE_FABRIC_SERVERS=",".join(servers),
            FLEETGATE_FABRIC_NODE_NAME=name,
            FLEETGATE_BROKER_PORT=str(self.port),
            FLEETGATE_BROKER_METRICS_PORT=str(metrics_port),
        )
        self.log = fleet.config.home / f"{name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "fleetgate"), "serve", "broker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def wait_listening(self) -> None:
        import socket

        def up() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, timeout=60, what="the broker node listening")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(15)


@pytest.mark.parametrize("version", [V311, V5])
def test_a_persistent_session_survives_sigkill_of_its_node(
    fleet: Fleet,
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
    version: int,
) -> None:
    """The subscriber's node is killed while it is connected, with messages in flight and
    more queued; the device resumes on another node and gets every one."""
    sensor_creds, ops_creds = pair
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()  # makes the server cert
    asyncio.run(_forget_sessions(cluster.nodes[0].url))
    victim = ProcessNode(fleet, [cluster.nodes[0].url], "node-k")
    try:
        victim.wait_listening()
        ops, _ = persistent(victim, ops_creds, version)
        assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
        ops.client.on_message = None  # receive but never acknowledge: all stays in flight
        ops.client.manual_ack_set(True)
        payloads = [f"k{i}".encode() for i in range(30)]
        publish_all(b, sensor_creds, payloads[:10])
        time.sleep(1.5)  # a checkpoint of the in-flight messages
        victim.kill()
        ops.client.loop_stop()
        publish_all(b, sensor_creds, payloads[10:])  # while the session's node is dead
        again, present = persistent(b, ops_creds, version)
        assert present
        got = receive(again, len(payloads))
        assert [m.payload for m in got] == payloads
        assert all(m.dup for m in got[:10])  # were in flight: again with DUP
        again.close()
    finally:
        if victim.process.poll() is None:
            victim.kill()
        b.stop()


def test_the_session_of_a_killed_node_expires_and_a_sweep_removes_its_record(
    fleet: Fleet, pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    """Its record still says "connected on node-k": a sweep finds node-k gone (no responder),
    starts the expiry clock, and a later sweep deletes the expired record."""
    _, ops_creds = pair
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    asyncio.run(_forget_sessions(cluster.nodes[0].url))
    victim = ProcessNode(fleet, [cluster.nodes[0].url], "node-k")
    try:
        victim.wait_listening()
        ops = Paho(victim, ops_creds, version=V5, clean=False, session_expiry=1)
        assert ops.connect()[0] == 0
        assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
        victim.kill()
        ops.client.loop_stop()
        sweep = b.broker.fabric.sessions.sweep
        record = record_of(cluster, "ops-1")
        assert record is not None and record.node == "node-k" and record.away_since is None
        b.call(lambda: None)
        asyncio.run_coroutine_threadsafe(sweep(), b._loop).result(10)
        record = record_of(cluster, "ops-1")
        assert record is not None and record.away_since is not None  # now counting
        time.sleep(1.1)
        assert asyncio.run_coroutine_threadsafe(sweep(), b._loop).result(10) == 1
        assert record_of(cluster, "ops-1") is None
    finally:
        if victim.process.poll() is None:
            victim.kill()
        b.stop()
