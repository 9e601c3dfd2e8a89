"""Wills in the fabric (issue 12): a device that drops on node A has its will delivered on node
B; a clean DISCONNECT leaves no will and no record; the will of a device whose node was
SIGKILLed is published by exactly one survivor, found through the nodes' heartbeats. Real
3-node nats-server cluster, broker nodes in this process and one in its own process (to be
killed by PID), real paho clients."""

# ruff: noqa: F811 - the tests take fixtures imported from other test modules

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from broker_helpers import Creds, Paho, enroll, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from test_broker_delivery import connected, pair  # noqa: F401 (sensor-1, ops-1)
from test_fabric_node import FabricBroker, cluster, nodes, paho_route  # noqa: F401

from broker.fabric.wills import (
    WILLS_BUCKET,
    Record,
    client_from_key,
    decode_record,
    encode_record,
    will_key,
)
from broker.mqtt import Properties, QoS, Will

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_fabric_kick import start_node

WILL_TOPIC = "devices/sensor-1/telemetry/status"


def _will_record(url: str, client_id: str) -> bytes | None:
    async def read() -> bytes | None:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value(WILLS_BUCKET)
            try:
                entry = await kv.get(will_key(client_id))
            except nats.js.errors.KeyNotFoundError:
                return None
            return entry.value
        finally:
            await nc.close()

    return asyncio.run(read())


def _watching(node: FabricBroker, creds: Creds) -> Paho:
    """ops-1 on ``node``, subscribed at QoS 1 to every device's telemetry."""
    watcher = connected(node, creds)
    assert watcher.subscribe("devices/+/telemetry/#", qos=1) == [1]
    return watcher


def _drain(client: Paho) -> None:
    while True:
        try:
            client.message(0.2)
        except queue.Empty:
            return


@pytest.mark.parametrize("qos", [0, 1])
def test_a_will_of_a_device_that_drops_on_one_node_reaches_another(nodes, pair, cluster, qos):
    (a, b), (sensor_creds, ops_creds) = nodes, pair
    ops = _watching(b, ops_creds)
    device = connected(a, sensor_creds, will=(WILL_TOPIC, b"gone", qos, False))
    paho_route(device, "devices/sensor-1/telemetry/probe", ops)
    assert _will_record(cluster.nodes[2].url, "sensor-1") is not None  # kept in the fabric
    device.drop()
    got = ops.message()
    assert (got.topic, got.payload, got.qos) == (WILL_TOPIC, b"gone", qos)
    ops.no_message()
    wait_for(lambda: _will_record(cluster.nodes[2].url, "sensor-1") is None, what="no record")
    ops.close()


def test_a_clean_disconnect_leaves_no_will_and_no_record(nodes, pair, cluster):
    (a, b), (sensor_creds, ops_creds) = nodes, pair
    ops = _watching(b, ops_creds)
    device = connected(a, sensor_creds, will=(WILL_TOPIC, b"gone", 1, False))
    paho_route(device, "devices/sensor-1/telemetry/probe", ops)
    device.close()
    wait_for(lambda: _will_record(cluster.nodes[0].url, "sensor-1") is None, what="no record")
    ops.no_message()
    ops.close()


def test_the_will_of_a_killed_node_is_published_once_by_a_survivor(
    fleet: Fleet, pair: tuple[Creds, Creds], cluster: NatsCluster, tmp_path: Path
) -> None:
    """Node A runs in its own process and is SIGKILLed with the device connected; nodes B
    and C each have a subscriber: each gets the will exactly once (two publishers would
    give each two copies), and exactly one of B and C claimed it."""
    sensor_creds, ops_creds = pair
    b = FabricBroker(fleet, [cluster.nodes[1].url], "node-b").start()
    c = FabricBroker(fleet, [cluster.nodes[2].url], "node-c").start()
    proc, port = start_node(fleet.config.home, cluster.nodes[0].url, "node-a", tmp_path / "a.log")
    try:
        # Two client ids: one id on two nodes is a session takeover across nodes (0x8E).
        watchers = [
            _watching(b, ops_creds),
            _watching(c, enroll(fleet, "ops-9", group="controllers")),
        ]

        class Remote:  # what Paho needs of a broker: its port and the fleet's CA
            pass

        remote: Any = Remote()
        remote.port, remote.fleet = port, fleet
        device = Paho(remote, sensor_creds, will=(WILL_TOPIC, b"node died", 1, False))
        assert device.connect()[0] == 0
        for watcher in watchers:
            paho_route(device, "devices/sensor-1/telemetry/probe", watcher)
        wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is not None)
        for watcher in watchers:
            _drain(watcher)
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for watcher in watchers:
            got = watcher.message(timeout=20)
            assert (got.topic, got.payload) == (WILL_TOPIC, b"node died")
        print(f"will of the killed node published {time.monotonic() - killed:.1f} s after kill")
        for watcher in watchers:
            watcher.no_message(1.0)
        claims = [n.call(lambda n=n: n.broker.fabric.wills.claimed) for n in (b, c)]
        assert sorted(claims) == [0, 1]
        wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is None, what="cleanup")
        device.client.loop_stop()
        for watcher in watchers:
            watcher.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        b.stop()
        c.stop()


def _delayed_will_client(
    node: Any, creds: Creds, delay: int, *, expiry: int = 60, clean: bool = True
) -> Paho:
    """A device (not connected yet) whose will waits ``delay`` seconds."""
    device = Paho(node, creds, session_expiry=expiry, clean=clean)
    props = PahoProperties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = delay
    device.client.will_set(WILL_TOPIC, b"late", 1, False, properties=props)
    return device


def _with_delayed_will(node: Any, creds: Creds, delay: int, **session: Any) -> Paho:
    device = _delayed_will_client(node, creds, delay, **session)
    assert device.connect()[0] == 0
    return device


def test_a_delayed_will_waits_and_a_reconnection_on_another_node_cancels_it(nodes, pair):
    (a, b), (sensor_creds, ops_creds) = nodes, pair
    ops = _watching(b, ops_creds)
    device = _with_delayed_will(a, sensor_creds, 2)
    paho_route(device, "devices/sensor-1/telemetry/probe", ops)
    dropped = time.monotonic()
    device.drop()
    got = ops.message()
    assert got.payload == b"late" and time.monotonic() - dropped >= 1.9
    # Dropped again, then its session resumed within the delay, on node B: the will is
    # cancelled on node A (a clean start would end the session: the will would go at once).
    device = _with_delayed_will(a, sensor_creds, 2)
    device.drop()
    back = connected(b, sensor_creds, clean=False, session_expiry=60)
    ops.no_message(3.5)
    back.close()
    ops.close()


@pytest.mark.parametrize("client_id", ["sensor-1", "", "ä/+ #$", "x" * 200])
def test_will_keys_name_any_client_id(client_id: str) -> None:
    key = will_key(client_id)
    assert re.fullmatch(r"[-/_=.A-Za-z0-9]+", key)
    assert client_from_key(key) == client_id


def test_a_will_record_round_trips_with_its_properties() -> None:
    props = Properties(
        will_delay_interval=30, content_type="text/plain", user_properties=(("k", "v"),)
    )
    will = Will(
        topic="devices/d/status",
        payload=b"\x00gone",
        qos=QoS.EXACTLY_ONCE,
        retain=True,
        properties=props,
    )
    record = decode_record(encode_record("n1.abc", "c-1", "d", will, 12.5))
    assert record == Record("n1.abc", "c-1", "d", will, 30, 12.5)
    assert decode_record(b"{}") is None and decode_record(b"not json") is None
