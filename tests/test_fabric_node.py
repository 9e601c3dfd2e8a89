"""Broker nodes on a real 3-node NATS cluster (issue 12, first slice): live routing across
nodes with real device certificates and real clients (paho, mosquitto_pub/sub, nats-py), no
echo duplicates, overlapping filters, refusals of topics NATS cannot carry, the start-up
checks (fabric unreachable, server too old), and QoS 1/2 stored in JetStream before the
acknowledgement, through a kill of the stream leader."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import nats
import nats.js.errors
import pytest
from broker_helpers import (
    V5,
    V311,
    Creds,
    MosquittoSub,
    Paho,
    RunningBroker,
    ThreadedBroker,
    enroll,
    free_port,
    mosquitto,
)
from conftest import Fleet
from nats_cluster import NatsCluster
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)

from broker.fabric.durable import STREAM, STREAM_PREFIX
from broker.fabric.node import (
    FabricUnavailable,
    InterestTree,
    check_server_version,
    message_from_nats,
    nats_headers,
)
from broker.fabric.subjects import topic_to_subject
from broker.mqtt import NO_PROPERTIES, Properties, QoS
from broker.routing import Message, SubscriptionOptions
from fleetgate.config import FabricSettings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats")) as running:
        yield running


class FabricBroker(RunningBroker):
    """A broker of ``fleet``'s data directory as one node of the fabric."""

    def __init__(self, fleet: Fleet, servers: list[str], name: str, **settings: Any) -> None:
        fabric = FabricSettings(servers=tuple(servers), node_name=name, connect_timeout_s=3.0)
        ThreadedBroker.__init__(self, dataclasses.replace(fleet.config, fabric=fabric), **settings)
        self.fleet = fleet


@pytest.fixture
def nodes(fleet: Fleet, cluster: NatsCluster) -> Iterator[tuple[FabricBroker, FabricBroker]]:
    """Node A on NATS server 1, node B on NATS server 2."""
    a = FabricBroker(fleet, [cluster.nodes[0].url], "node-a").start()
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    yield a, b
    a.stop()
    b.stop()


_probes = itertools.count()


def await_route(publish: Callable[[bytes], None], received: Callable[[float], bytes]) -> None:
    """Publish probes until one arrives: a new subscription reaches the other NATS servers
    asynchronously (core NATS drops what is published before), then drain the late probes."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publish(f"probe-{next(_probes)}".encode())
        try:
            while not received(0.2).startswith(b"probe-"):
                pass
            break
        except queue.Empty:
            continue
    else:
        raise AssertionError("no probe crossed the fabric within 10 s")
    with_late = time.monotonic() + 0.3
    while time.monotonic() < with_late:
        with contextlib.suppress(queue.Empty):
            received(0.05)


def paho_route(publisher: Paho, topic: str, subscriber: Paho) -> None:
    await_route(
        lambda payload: publisher.publish(topic, payload),
        lambda timeout: subscriber.message(timeout).payload,
    )


@pytest.mark.parametrize("version", [V311, V5])
def test_a_message_published_on_one_node_reaches_a_subscriber_on_another(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], version: int
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = connected(b, ops_creds, version=version)
    assert ops.subscribe("devices/+/telemetry/#") == [0]
    sensor = connected(a, sensor_creds, version=version)
    paho_route(sensor, "devices/sensor-1/telemetry/temp", ops)
    sensor.publish("devices/sensor-1/telemetry/temp", b"21.5")
    got = ops.message()
    assert (got.topic, got.payload, got.qos, got.retain) == (
        "devices/sensor-1/telemetry/temp",
        b"21.5",
        0,
        False,
    )
    ops.no_message()
    sensor.close()
    ops.close()


def test_no_echo_duplicate_on_the_origin_node_and_one_copy_for_overlapping_filters(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], fleet: Fleet
) -> None:
    """A subscriber on the origin node gets the message once (routed locally; the node's own
    publish does not come back from NATS); one on the other node with two overlapping filters
    gets it once too."""
    a, b = nodes
    sensor_creds, ops_creds = pair
    local = connected(a, enroll(fleet, "ops-2", group="controllers"))
    assert local.subscribe("devices/sensor-1/telemetry/#") == [0]
    remote = connected(b, ops_creds)
    assert remote.subscribe("devices/+/telemetry/#") == [0]
    assert remote.subscribe("devices/sensor-1/telemetry/+") == [0]
    sensor = connected(a, sensor_creds)
    paho_route(sensor, "devices/sensor-1/telemetry/x", remote)
    while True:  # the local subscriber saw every probe at once: drop them
        try:
            local.message(0.2)
        except queue.Empty:
            break
    sensor.publish("devices/sensor-1/telemetry/x", b"once")
    assert local.message().payload == b"once"
    assert remote.message().payload == b"once"
    local.no_message()
    remote.no_message()
    for client in (sensor, local, remote):
        client.close()


def test_mosquitto_clients_across_nodes(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    sub = MosquittoSub(a, ops_creds, "-t", "devices/+/telemetry/#", "-v", version="mqttv311")
    try:
        sub.wait_line(lambda line: "received SUBACK" in line)

        def publish(payload: bytes) -> None:
            done = mosquitto(
                "mosquitto_pub",
                b,
                sensor_creds,
                "-t",
                "devices/sensor-1/telemetry/m",
                "-m",
                payload.decode(),
            )
            assert done.returncode == 0, done.stdout + done.stderr

        def received(timeout: float) -> bytes:
            try:
                line = sub.wait_line(lambda line: line.startswith("devices/"), timeout)
            except AssertionError:
                raise queue.Empty from None
            return line.split(" ", 1)[1].encode()

        await_route(publish, received)
        publish(b"from-mosquitto")
        assert received(10) == b"from-mosquitto"
    finally:
        sub.stop()


def test_nats_native_clients_share_the_subjects(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    """A NATS-native subscriber reads device telemetry at the mapped subject, and a NATS-native
    publisher reaches an MQTT subscriber (no permissions are configured in this cluster)."""
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = connected(b, ops_creds)
    assert ops.subscribe("devices/+/telemetry/#") == [0]
    sensor = connected(a, sensor_creds)

    async def run() -> None:
        nc = await nats.connect(cluster.nodes[2].url)
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def on_message(msg: Any) -> None:
            await got.put((msg.subject, msg.data))

        await nc.subscribe("devices.sensor-1.telemetry.>", cb=on_message)
        await nc.flush()
        while True:  # until the subscription reached node A's server
            await asyncio.to_thread(sensor.publish, "devices/sensor-1/telemetry/v1.2", b"n")
            try:
                subject, data = await asyncio.wait_for(got.get(), 0.3)
                break
            except TimeoutError:
                continue
        assert (subject, data) == ("devices.sensor-1.telemetry.v1//2", b"n")

        def publish(payload: bytes) -> None:
            asyncio.run_coroutine_threadsafe(
                nc.publish("devices.sensor-9.telemetry.native", payload), loop
            ).result(5)

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(await_route, publish, lambda timeout: ops.message(timeout).payload)
        await nc.publish("devices.sensor-9.telemetry.native", b"from-nats")
        await nc.flush()
        message = await asyncio.to_thread(ops.message)
        assert (message.topic, message.payload) == (
            "devices/sensor-9/telemetry/native",
            b"from-nats",
        )
        await nc.close()

    asyncio.run(run())
    sensor.close()
    ops.close()


def test_topics_nats_cannot_carry_are_refused_and_audited(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    a, _ = nodes
    sensor_creds, ops_creds = pair
    sensor = connected(a, sensor_creds)
    assert sensor.publish("devices/sensor-1/a*b", b"x", qos=1) == 0x90
    assert sensor.publish("devices/sensor-1/>", b"x", qos=1) == 0x90
    assert sensor.publish("devices/sensor-1/with space", b"x", qos=1) == 0x90
    assert sensor.publish("devices/sensor-1/fine", b"x", qos=1) == 0
    ops = connected(a, ops_creds)
    assert ops.subscribe("devices/*/telemetry/#") == [0x8F]
    assert ops.subscribe("devices/+/telemetry/>") == [0x8F]
    ops.close()
    ops_v3 = connected(a, ops_creds, version=V311)
    assert ops_v3.subscribe("devices/*/telemetry/#") == [0x80]
    # Audited; repeats of one kind by one client collapse into one row per interval.
    for device, action in (("sensor-1", "mqtt.publish"), ("ops-1", "mqtt.subscribe")):
        refused = a.audit_events(device, action=action, outcome="refused")
        assert refused and all("the fabric cannot carry" in event.reason for event in refused)
    sensor.close()
    ops_v3.close()


def test_a_node_that_cannot_reach_the_fabric_does_not_start(fleet: Fleet) -> None:
    port = free_port()
    node = FabricBroker(fleet, [f"nats://127.0.0.1:{port}"], "lonely")
    with pytest.raises(
        FabricUnavailable, match=f"cannot reach the fabric at nats://127.0.0.1:{port}"
    ):
        node.start()
    node.stop()


def test_a_node_whose_session_bucket_cannot_be_set_up_does_not_start(
    fleet: Fleet, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FG_SESSIONS taken by a stream of another shape: the node refuses to start, like for the
    retained stream or the will buckets, and leaves no NATS connection behind."""
    from nats.js.api import StreamConfig

    import broker.fabric.node as node_module
    from broker.fabric.sessions import BUCKET

    monkeypatch.setattr(node_module, "SETUP_TIMEOUT_S", 1.0)  # the 3 s connect timeout rules
    name = f"KV_{BUCKET}"

    async def take_bucket(conflicting: bool) -> None:
        nc = await nats.connect(cluster.nodes[0].url)
        js = nc.jetstream(timeout=10)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
        if conflicting:  # not a KV bucket's shape: create_key_value refuses it
            await js.add_stream(StreamConfig(name=name, subjects=["not.a.bucket.>"]))
        await nc.close()

    asyncio.run(take_bucket(True))
    node = FabricBroker(fleet, [cluster.nodes[0].url], "no-sessions")
    try:
        with pytest.raises(FabricUnavailable, match="wills or sessions"):
            node.start()
        client_names = {
            conn.get("name")
            for server in cluster.nodes
            for conn in (server.http_json("/connz") or {}).get("connections") or []
        }
        assert "fleetgate-no-sessions" not in client_names
    finally:
        node.stop()
        asyncio.run(take_bucket(False))


@pytest.mark.parametrize("version", ["2.9.10", "2.9.25", "1.4.1"])
def test_servers_older_than_2_10_are_refused(version: str) -> None:
    with pytest.raises(FabricUnavailable, match=r"needs 2\.10 or newer"):
        check_server_version(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.10.27", "2.15.1", "3.0.0"])
def test_servers_from_2_10_are_accepted(version: str) -> None:
    check_server_version(version)


# -- sans-I/O pieces ------------------------------------------------------------------------------


def test_plain_qos0_messages_carry_no_headers_and_others_round_trip() -> None:
    plain = Message("a/b", b"p", QoS.AT_MOST_ONCE, False, NO_PROPERTIES, "c")
    assert nats_headers(plain, 100.0) is None
    props = Properties(content_type="text/plain", user_properties=(("k", "v"),))
    rich = Message("a/b.c", b"p", QoS.AT_LEAST_ONCE, True, props, "c", expires_at=130.0)
    headers = nats_headers(rich, 100.0)
    assert headers is not None and headers["Nmqtt-Pub"] == "1" and headers["Fg-Expiry"] == "30"
    back = message_from_nats("a.b//c", b"p", headers, 200.0)
    assert back == Message("a/b.c", b"p", QoS.AT_LEAST_ONCE, False, props, "", 230.0)


@pytest.mark.parametrize(
    ("subject", "headers"),
    [
        ("a.+", None),  # a NATS-native subject whose topic has an MQTT wildcard
        ("a.#", None),
        ("a.b", {"Nmqtt-Pub": "7"}),
        ("a.b", {"Fg-Props": "not base64!"}),
        ("a.b", {"Fg-Props": "AQ=="}),  # a property block that does not parse
    ],
)
def test_nats_messages_that_are_no_mqtt_message_are_dropped(
    subject: str, headers: dict[str, str] | None
) -> None:
    assert message_from_nats(subject, b"x", headers, 0.0) is None


def test_interest_tree_reports_first_and_last_subscriber_of_a_filter() -> None:
    events: list[tuple[str, str]] = []
    tree = InterestTree(lambda f: events.append(("first", f)), lambda f: events.append(("last", f)))
    options = SubscriptionOptions(QoS.AT_MOST_ONCE)
    tree.add("a/#", "c1", options)
    tree.add("a/#", "c2", options)
    tree.add("a/#", "c1", options)  # replaced options: not a new subscriber
    tree.remove("a/#", "c1")
    assert events == [("first", "a/#")]
    tree.remove("a/#", "c3")  # never subscribed
    tree.remove("a/#", "c2")
    assert events == [("first", "a/#"), ("last", "a/#")]
    assert not tree.has("a/#")


# -- QoS 1/2 from devices, stored in JetStream before the acknowledgement -------------------------


async def _stream_messages(url: str, subject: str) -> list[Any]:
    """Every message of FG_MSGS on ``subject``, read back directly from the stream."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(STREAM, subjects_filter=subject)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            message = await js.get_msg(STREAM, seq)
        except nats.js.errors.NotFoundError:
            continue
        if message.subject == subject:
            found.append(message)
    await nc.close()
    return found


@pytest.mark.parametrize("qos", [1, 2])
def test_qos_1_and_2_from_a_device_are_in_the_stream_before_the_acknowledgement(
    nodes: tuple[FabricBroker, FabricBroker],
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
    qos: int,
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = connected(b, ops_creds)
    assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
    sensor = connected(a, sensor_creds)
    paho_route(sensor, "devices/sensor-1/telemetry/q", ops)
    topic = f"devices/sensor-1/telemetry/q{qos}.{time.monotonic_ns()}"
    while not sensor.events.published.empty():  # the probes' QoS 0 publish events
        sensor.events.published.get()
    assert sensor.publish(topic, b"kept", qos=qos) == 0
    # The acknowledgement came: the stream has the message, once, on three replicas.
    subject = STREAM_PREFIX + topic_to_subject(topic)
    stored = asyncio.run(_stream_messages(cluster.nodes[2].url, subject))
    assert [m.data for m in stored] == [b"kept"]
    assert stored[0].headers["Nats-Msg-Id"].startswith("node-a.")
    assert stored[0].headers["Nmqtt-Pub"] == str(qos)
    got = ops.message()
    assert (got.topic, got.payload, got.qos) == (topic, b"kept", 1)
    assert a.metric("fabric_stored_total", 'node="node-a"') >= 1
    assert a.metric("fabric_connected", 'node="node-a"') == 1
    assert a.metric("fabric_forwarded_total", 'node="node-a"') >= 1
    assert b.metric("fabric_received_total", 'node="node-b"') >= 1
    sensor.close()
    ops.close()


def test_the_stream_is_replicated_as_configured(
    nodes: tuple[FabricBroker, FabricBroker], cluster: NatsCluster
) -> None:
    async def replicas() -> int:
        nc = await nats.connect(cluster.nodes[0].url)
        info = await nc.jetstream().stream_info(STREAM)
        await nc.close()
        return int(info.config.num_replicas)

    assert asyncio.run(replicas()) == 3


@pytest.mark.parametrize("version", [V311, V5])
def test_a_message_the_stream_cannot_store_is_not_acknowledged(
    nodes: tuple[FabricBroker, FabricBroker],
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
    version: int,
) -> None:
    """Without the stream (deleted here; a lost quorum looks the same: 503, no answer) the
    node resends, then gives up: MQTT 5 gets PUBACK 0x83, 3.1.1 a close without PUBACK."""
    a, _ = nodes
    sensor_creds, _ = pair

    def impatient() -> None:
        a.broker.fabric.ledger.ack_timeout_s = 0.2
        a.broker.fabric.ledger.give_up_s = 1.0

    a.call(impatient)

    async def delete_stream() -> None:
        nc = await nats.connect(cluster.nodes[0].url)
        await nc.jetstream().delete_stream(STREAM)
        await nc.close()

    asyncio.run(delete_stream())  # the next node to start creates it again
    sensor = connected(a, sensor_creds, version=version)
    if version == V5:
        assert sensor.publish("devices/sensor-1/telemetry/lost", b"x", qos=1) == 0x83
    else:
        sensor.client.publish("devices/sensor-1/telemetry/lost", b"x", qos=1)
        code, _ = sensor.disconnect_code()
        assert code != 0
    assert a.call(lambda: a.broker.fabric.not_stored) == 1
    assert a.call(lambda: a.broker.fabric.resent) >= 1
    sensor.close()


def test_a_killed_stream_leader_holds_acknowledgements_and_loses_nothing(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], cluster: NatsCluster
) -> None:
    """kill -9 of FG_MSGS's leader while a device publishes QoS 1 one message at a time: the
    PUBACKs stop during the Raft election and resume; every acknowledged message is in the
    stream exactly once (resends reuse their Nats-Msg-Id)."""
    a, _ = nodes
    sensor_creds, _ = pair
    sensor = connected(a, sensor_creds)
    topic = f"devices/sensor-1/telemetry/kill{time.monotonic_ns()}"
    acked: list[tuple[float, bytes, int]] = []
    stop = threading.Event()

    def publish() -> None:
        for index in itertools.count():
            if stop.is_set():
                return
            payload = f"m{index}".encode()
            acked.append((time.monotonic(), payload, sensor.publish(topic, payload, qos=1)))

    async def leader() -> str:
        nc = await nats.connect(cluster.nodes[0].url)
        info = await nc.jetstream().stream_info(STREAM)
        await nc.close()
        return str(info.cluster.leader)  # type: ignore[union-attr]

    (victim,) = [node for node in cluster.nodes if node.name == asyncio.run(leader())]
    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        wait_until = time.monotonic() + 10
        while len(acked) < 50 and time.monotonic() < wait_until:
            time.sleep(0.01)
        killed_at = time.monotonic()
        cluster.kill(victim)
        while time.monotonic() < killed_at + 20:  # until acknowledgements flow again
            if len([t for t, _, _ in acked if t > killed_at]) >= 50:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        publisher.join(15)
    times = [t for t, _, _ in acked]
    gap = max(later - earlier for earlier, later in itertools.pairwise(times))
    print(f"acked {len(acked)}, longest PUBACK gap {gap:.2f} s after the leader kill")
    assert {code for _, _, code in acked} == {0}
    assert len([t for t in times if t > killed_at]) >= 50
    survivor = next(node for node in cluster.nodes if node is not victim)
    stored = asyncio.run(_stream_messages(survivor.url, STREAM_PREFIX + topic_to_subject(topic)))
    payloads = [m.data for m in stored]
    assert sorted(payloads) == sorted(p for _, p, _ in acked)  # none lost, none twice
    sensor.close()
    cluster.restart(victim)
