"""A bound on the fabric's message stream (issue 12): ``FG_MSGS`` holds at most ``[fabric]
stream_max_bytes`` and refuses new messages when full (discard new), so a device with a valid
certificate cannot fill the NATS servers' disks and nothing acknowledged is lost. Once full, a
node refuses QoS 1/2 at once (0x97 on MQTT 5, a close without PUBACK on 3.1.1), audits it per
client within the core's throttle, logs the change and shows it on /metrics; QoS 0 goes on;
messages acknowledged before still reach a persistent session; with room again (here: purged)
QoS 1 is taken again. A stream made by an older node, without the cap, gets it at start.
Real 3-node nats-server cluster, real broker nodes, real paho clients."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from broker_helpers import V5, V311, Creds, RunningBroker, ThreadedBroker, enroll, wait_for
from conftest import Fleet
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats_cluster import NatsCluster
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_sessions import cluster, persistent, record_of  # noqa: F401 (cluster: module)

from broker.fabric.durable import STREAM, STREAM_PREFIX, StreamRoom, refused_as_full
from fleetgate.config import FabricSettings

CAP = 64 * 1024
TOPIC = "devices/sensor-1/telemetry/bulk"
FULL_LOG = f"{STREAM} is full"


class CappedNode(RunningBroker):
    """A broker node of ``fleet`` on the fabric, with FG_MSGS capped at ``CAP`` bytes."""

    def __init__(self, fleet: Fleet, servers: list[str], name: str) -> None:
        fabric = FabricSettings(
            servers=tuple(servers), node_name=name, connect_timeout_s=3.0, stream_max_bytes=CAP
        )
        ThreadedBroker.__init__(self, dataclasses.replace(fleet.config, fabric=fabric))
        self.fleet = fleet


async def _as_an_older_node_made_it(url: str) -> None:
    """FG_MSGS as nodes before the cap created it: no byte limit, discard old."""
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[STREAM_PREFIX + ">"],
            storage=StorageType.FILE,
            num_replicas=3,
            max_age=24 * 3600.0,
            duplicate_window=120.0,
        )
    )
    await nc.close()


async def _stream(url: str, purge: bool = False) -> Any:
    nc = await nats.connect(url)
    js = nc.jetstream()
    if purge:
        await js.purge_stream(STREAM)
    info = await js.stream_info(STREAM)
    await nc.close()
    return info


@pytest.fixture
def nodes(fleet: Fleet, cluster: NatsCluster) -> Iterator[tuple[CappedNode, CappedNode]]:
    asyncio.run(_as_an_older_node_made_it(cluster.nodes[2].url))
    a = CappedNode(fleet, [cluster.nodes[0].url], "node-a").start()
    b = CappedNode(fleet, [cluster.nodes[1].url], "node-b").start()
    yield a, b
    a.stop()
    b.stop()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Log records from before the nodes start (the stream update at start)."""
    caplog.set_level(logging.INFO, logger="fleetgate")
    return caplog


def test_a_full_stream_refuses_new_qos_1_with_0x97_and_keeps_what_it_acknowledged(
    fleet: Fleet,
    cluster: NatsCluster,
    pair: tuple[Creds, Creds],
    caplog_info: pytest.LogCaptureFixture,
    nodes: tuple[CappedNode, CappedNode],
) -> None:
    caplog = caplog_info
    a, b = nodes
    info = asyncio.run(_stream(cluster.nodes[2].url))
    assert (info.config.max_bytes, info.config.discard) == (CAP, DiscardPolicy.NEW)
    update = f"stream {STREAM} changed to this node's settings"
    updates = [r.getMessage() for r in caplog.get_records("setup") if update in r.getMessage()]
    assert updates == [f"{update}: max_bytes -1 -> {CAP}, discard old -> new"]  # once

    sensor_creds, ops_creds = pair
    ops, _ = persistent(b, ops_creds, V5)
    assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]
    ops.close()
    wait_for(lambda: (r := record_of(cluster, "ops-1")) and r.away_since, what="ops away")

    sensor = connected(a, sensor_creds, version=V5)
    acknowledged, refused = [], []
    for i in range(2 * CAP // 1000):  # 1000-byte payloads: full well before the end
        payload = b"%04d" % i + b"x" * 996
        code = sensor.publish(TOPIC, payload, qos=1)
        if code:
            refused.append((payload, code))
            break
        acknowledged.append(payload)
    assert refused, f"{len(acknowledged)} messages taken by a {CAP}-byte stream"
    # The message the stream refused got the store-error answer (0x83) unless the node
    # already knew; every one after it gets Quota exceeded at once.
    assert refused[0][1] in (0x83, 0x97)
    print(f"{CAP} B cap: {len(acknowledged)} x 1000 B taken, then {refused[0][1]:#x}")
    assert sensor.publish(TOPIC, b"over the cap", qos=1) == 0x97
    publish_qos0(sensor, b"qos 0 is not stored")
    label = 'node="node-a"'
    assert a.metric("fabric_stream_full", label) == 1
    assert a.metric("fabric_stream_full_refused_total", label) >= 1
    assert a.metric("fabric_available", label) == 1  # full is not down

    v3 = connected(a, enroll(fleet, "sensor-2"), version=V311)
    v3.client.publish("devices/sensor-2/telemetry/t", b"over the cap", qos=1)
    code, _ = v3.disconnect_code()
    assert code != 0  # closed without PUBACK: the client keeps the message
    assert v3.events.published.empty()

    rows = wait_for(
        lambda: a.audit_events("sensor-1", action="mqtt.publish", outcome="refused"),
        what="the refusal audited",
    )
    assert f"{STREAM} is full ([fabric] stream_max_bytes = {CAP})" in rows[0].reason
    assert TOPIC in rows[0].reason

    # Everything acknowledged before is still delivered, in order, to the session.
    again, present = persistent(a, ops_creds, V5)
    assert present
    got = [again.message(15).payload for _ in acknowledged]
    assert got == acknowledged
    extra = _drain(again)  # at most the live copy of the one the stream refused
    assert set(extra) <= {refused[0][0]}, extra
    publish_qos0(sensor, b"live qos 0")  # QoS 0 still flows
    assert again.message(15).payload == b"live qos 0"

    # Room again (an operator purged it): QoS 1 is taken again.
    asyncio.run(_stream(cluster.nodes[2].url, purge=True))
    wait_for(lambda: a.metric("fabric_stream_full", label) == 0, 15, "room again")
    assert sensor.publish(TOPIC, b"after", qos=1) == 0
    assert again.message(15).payload == b"after"
    assert a.metric("fabric_stream_full_changes_total", label) == 2
    for client in (sensor, again):
        client.close()
    full = [line for line in _lines(caplog, FULL_LOG) if "refused until" in line]
    assert len(full) == 1, full
    assert len(_lines(caplog, f"{STREAM} has room again")) == 1


def publish_qos0(client: Any, payload: bytes) -> None:
    """Publish at QoS 0 and take paho's callback for it off the queue QoS 1 answers use."""
    assert client.publish(TOPIC, payload, qos=0) == 0
    client.events.published.get(timeout=5)


def _drain(client: Any) -> list[bytes]:
    payloads = []
    try:
        while True:
            payloads.append(client.message(1.0).payload)
    except queue.Empty:
        return payloads


# -- the decisions, without I/O ------------------------------------------------------------------


def test_only_the_caps_refusal_counts_as_full() -> None:
    full = b'{"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"},'
    assert refused_as_full(full + b'"stream":"FG_MSGS","seq":0}')
    assert not refused_as_full(b'{"error":{"code":503,"description":"no leader"}}')
    assert not refused_as_full(
        b'{"error":{"code":503,"err_code":10077,"description":"other store failure"}}'
    )
    assert not refused_as_full(b'{"stream":"FG_MSGS","seq":3}')
    assert not refused_as_full(b'"err_code":10077 but no json')


def test_a_full_stream_takes_qos_1_again_once_1_percent_and_the_refused_message_fit() -> None:
    room = StreamRoom(100_000)
    assert room.filled(500) and not room.filled(300)  # one change, however many refusals
    assert not room.measured(99_500, 100_000)
    assert room.measured(99_000, 100_000)
    assert not room.full and room.changes == 2
    assert not room.measured(0, 100_000)  # not full: nothing to end
    assert room.filled(2_000)  # a large message: 1 % of the cap would not hold it
    assert not room.measured(99_000, 100_000)
    assert room.measured(98_000, 100_000)
    assert room.filled(500) and room.measured(100_000, -1)  # an operator removed the cap
    record = room.refusal("sensor-1", "a/b", 1)
    assert (record.actor, record.action, record.outcome, record.subject) == (
        "device:sensor-1",
        "mqtt.publish",
        "refused",
        "sensor-1",
    )
