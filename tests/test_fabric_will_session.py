"""A will and its persistent session settle together across nodes (issue 12, MQTT 5 3.1.2.5,
3.1.3.2.2): the will of a device whose node was SIGKILLed is published when its delay elapses
or when its session ends, whichever comes first, exactly once; the device resuming its session
on another node before then cancels it, also after a survivor has claimed it. Real 3-node
nats-server cluster, one broker node in its own process (killed by PID), one in this process,
real paho clients."""

# ruff: noqa: F811 - the tests take fixtures imported from other test modules

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from broker_helpers import Creds, Paho, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster
from test_broker_delivery import pair  # noqa: F401 (sensor-1, ops-1)
from test_fabric_node import FabricBroker, paho_route
from test_fabric_sessions import ProcessNode, cluster, record_of  # noqa: F401
from test_fabric_shared_resume import survivor  # noqa: F401 (node B, no session records)
from test_fabric_wills import (
    WILL_TOPIC,
    _delayed_will_client,
    _drain,
    _watching,
    _will_record,
    _with_delayed_will,
)

from broker.fabric.records import record_key
from broker.fabric.wills import decode_record, encode_record
from broker.mqtt import Will


def test_a_will_record_names_its_session_by_client_id_and_expiry() -> None:
    will = Will(topic=WILL_TOPIC, payload=b"late")
    record = decode_record(encode_record("node-k.e1", "sensor-1", "sensor-1", will, None, 300))
    assert record is not None and record.expiry == 300
    assert record.session_key() == record_key("sensor-1")  # its FG_SESSIONS record
    clean = decode_record(encode_record("node-k.e1", "sensor-1", "sensor-1", will, None))
    assert clean is not None and clean.session_key() is None  # ends with its connection
    older = json.loads(encode_record("node-k.e1", "sensor-1", "sensor-1", will, 5.0, 300))
    del older["expiry"]  # written by a node before this field
    assert decode_record(json.dumps(older).encode()).expiry == 0  # type: ignore[union-attr]


@pytest.fixture
def doomed(fleet: Fleet, cluster: NatsCluster, survivor: FabricBroker) -> Iterator[ProcessNode]:
    """Node K on NATS server 1, in its own process, to be SIGKILLed."""
    node = ProcessNode(fleet, [cluster.nodes[0].url], "node-k")
    try:
        node.wait_listening()
        yield node
    finally:
        if node.process.poll() is None:
            node.kill()


def _on_doomed_node(
    doomed: ProcessNode, survivor: FabricBroker, pair: tuple[Creds, Creds], delay: int, expiry: int
) -> tuple[Paho, Paho]:
    """sensor-1 in a persistent session with a delayed will on node K, ops-1 watching on B."""
    sensor_creds, ops_creds = pair
    watcher = _watching(survivor, ops_creds)
    device = _with_delayed_will(doomed, sensor_creds, delay, expiry=expiry, clean=False)
    paho_route(device, "devices/sensor-1/telemetry/probe", watcher)
    _drain(watcher)
    return device, watcher


def _claimed(node: FabricBroker) -> int:
    return int(node.call(lambda: node.broker.fabric.wills.claimed))


def test_a_device_resuming_within_the_delay_cancels_the_will_a_survivor_claimed(
    doomed: ProcessNode,
    survivor: FabricBroker,
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
) -> None:
    delay = 6
    device, watcher = _on_doomed_node(doomed, survivor, pair, delay, 300)
    wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is not None, what="record")
    doomed.kill()
    device.client.loop_stop()
    wait_for(lambda: _claimed(survivor) == 1, timeout=20, what="the will claimed by node B")
    claimed = time.monotonic()
    record = decode_record(_will_record(cluster.nodes[1].url, "sensor-1") or b"")
    assert record is not None and record.due is not None and record.expiry == 300
    session = record_of(cluster, "sensor-1")  # marked away by the claim: one clock for both
    assert session is not None and session.away_since is not None
    again = _delayed_will_client(survivor, pair[0], delay, expiry=300, clean=False)
    code, present, _ = again.connect()
    assert code == 0 and present
    # The claimed will was due `delay` s after the claim: it never comes.
    watcher.no_message(max(0.0, claimed + delay + 2 - time.monotonic()))
    assert survivor.call(lambda: survivor.broker.fabric.wills.wills_published) == 0
    again.close()
    watcher.close()


def test_a_session_that_ends_before_the_will_delay_publishes_the_will_once(
    doomed: ProcessNode,
    survivor: FabricBroker,
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
) -> None:
    """Will delay 60 s, session expiry 3 s, its node dies and it never comes back: the will
    is published when the session ends (~3 s after the survivor noticed), not after 60 s."""
    device, watcher = _on_doomed_node(doomed, survivor, pair, 60, 3)
    wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is not None, what="record")
    killed = time.monotonic()
    doomed.kill()
    device.client.loop_stop()
    got = watcher.message(timeout=30)
    took = time.monotonic() - killed
    assert (got.topic, got.payload) == (WILL_TOPIC, b"late")
    print(f"will published {took:.1f} s after the kill (expiry 3 s, will delay 60 s)")
    assert 3.0 <= took < 20.0
    session = record_of(cluster, "sensor-1")
    assert session is not None and session.expired(time.time())  # ended with the will
    watcher.no_message(2.0)  # once
    assert _claimed(survivor) == 1
    wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is None, what="cleanup")
    watcher.close()


def test_a_new_session_on_another_node_publishes_the_claimed_will_at_once(
    doomed: ProcessNode,
    survivor: FabricBroker,
    pair: tuple[Creds, Creds],
    cluster: NatsCluster,
) -> None:
    """Clean start ends the old session (MQTT 5 3.1.2.5): its will, claimed by a survivor and
    waiting for a 30 s delay, is published when the device connects again, once."""
    device, watcher = _on_doomed_node(doomed, survivor, pair, 30, 300)
    wait_for(lambda: _will_record(cluster.nodes[1].url, "sensor-1") is not None, what="record")
    doomed.kill()
    device.client.loop_stop()
    wait_for(lambda: _claimed(survivor) == 1, timeout=20, what="the will claimed by node B")
    fresh = _delayed_will_client(survivor, pair[0], 30, expiry=300, clean=True)
    started = time.monotonic()
    code, present, _ = fresh.connect()
    assert code == 0 and not present
    got = watcher.message(timeout=10)
    assert (got.topic, got.payload) == (WILL_TOPIC, b"late")
    assert time.monotonic() - started < 5.0  # not at the claimed will's 30 s
    watcher.no_message(2.0)  # once
    fresh.close()  # a clean DISCONNECT: the new will is not published
    watcher.no_message(1.0)
    watcher.close()
