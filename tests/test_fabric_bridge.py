"""Bridges in fabric mode: two fleetgate nodes (``fleetgate serve broker`` processes) on a real
3-node nats-server cluster share one ``[[bridge]]`` to Debian's Mosquitto over mutual TLS.
Each message reaches the upstream once per cluster, not once per node; the owner SIGKILLed
mid-stream hands over to the other node without losing an acknowledged message; an upstream
outage leaves the messages in the stream until it returns; commands from the upstream reach
subscribers on every node. The pure rules (consumer subjects, the lease) are tested alone."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import (
    SITE,
    Publisher,
    Subscriber,
    allow_bridges,
    bridge_identity,
    bridge_status,
    bridge_toml,
    configure,
    metric,
    one_bridge,
    upstream_mosquitto,
)
from broker_helpers import Creds, enroll, free_port, wait_for
from conftest import Fleet
from nats_cluster import NatsCluster
from sdk_helpers import Mosquitto
from test_fabric_sessions import ProcessNode, cluster  # noqa: F401 (cluster: one per module)
from typer.testing import CliRunner

# ruff: noqa: F811 - the tests take the `cluster` fixture imported from test_fabric_sessions
from broker.bridge.plan import plan_bridge
from broker.fabric.bridge import (
    LEASE_TTL_S,
    RENEW_S,
    EchoFilter,
    Lease,
    consumer_name,
    holder_node,
    stream_subjects,
    subject_covers,
    subjects_overlap,
)
from fleetgate.cli import app
from fleetgate.config import BridgeRule, BridgeSettings
from fleetgate.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


# -- pure rules ---------------------------------------------------------------------------------


def test_the_consumer_reads_each_out_rule_once_without_overlapping_filters(fleet: Fleet) -> None:
    settings = BridgeSettings(
        name="up.1",
        host="localhost",
        keystore="ks",
        out=(
            BridgeRule(local="devices/#", remote="a/#"),
            BridgeRule(local="devices/+/telemetry", remote="b/+/t"),  # inside devices/#
            BridgeRule(local="alarms/+/x", remote="c/+/x"),
        ),
    )
    plan = plan_bridge(fleet.config, settings)
    assert stream_subjects(plan) == ["$FG.q.alarms.*.x", "$FG.q.devices", "$FG.q.devices.>"]
    assert subject_covers("a.*.c", "a.b.c") and not subject_covers("a.b.c", "a.*.c")
    assert subject_covers("a.>", "a.*.c") and not subject_covers("a.*", "a.>")
    assert not subject_covers("a.>", "a")
    assert consumer_name("central") == "FG_BRIDGE_central"
    assert "." not in consumer_name("up.1")
    assert holder_node("node-a.1f2e3d") == "node-a"


def test_out_rules_that_overlap_partially_are_refused_in_fabric_mode(fleet: Fleet) -> None:
    settings = BridgeSettings(
        name="up",
        host="localhost",
        keystore="ks",
        out=(BridgeRule(local="a/+/c", remote="x/+/c"), BridgeRule(local="a/b/+", remote="y/+")),
    )
    with pytest.raises(ConfigError, match="'a/\\+/c' and 'a/b/\\+' overlap"):
        stream_subjects(plan_bridge(fleet.config, settings))
    assert subjects_overlap("a.*.c", "a.b.*") and subjects_overlap("a.>", "a.b")
    assert not subjects_overlap("a.b", "a.c") and not subjects_overlap("a.*", "a.b.c")


def test_a_lease_not_renewed_in_time_is_given_up_before_it_can_expire() -> None:
    lease = Lease("node-a.e1")
    assert not lease.valid(0.0)
    lease.won(7, 100.0)
    assert lease.valid(100.0 + LEASE_TTL_S - RENEW_S - 0.01)
    assert not lease.valid(100.0 + LEASE_TTL_S - RENEW_S)  # another node may take it soon
    lease.lost("node-b.e2")
    assert lease.revision is None and holder_node(lease.holder) == "node-b"


def test_an_inbound_qos_0_message_is_recognised_once_when_it_comes_back() -> None:
    echoes = EchoFilter(window_s=10.0)
    echoes.published("devices/d1/commands", b"x", 0.0)
    echoes.published("devices/d1/commands", b"x", 1.0)
    assert not echoes.echo("devices/d1/commands", b"y", 2.0)
    assert echoes.echo("devices/d1/commands", b"x", 2.0)
    assert echoes.echo("devices/d1/commands", b"x", 2.0)
    assert not echoes.echo("devices/d1/commands", b"x", 2.0)  # a device's own, later: forwarded
    echoes.published("devices/d1/commands", b"z", 3.0)
    assert not echoes.echo("devices/d1/commands", b"z", 13.5)  # never came back: forgotten


# -- real nodes, real upstream -------------------------------------------------------------------


class NodeProcess(ProcessNode):
    """``fleetgate serve broker`` as a fabric node, with a metrics port to ask ``/bridges``."""

    def __init__(self, fleet: Fleet, servers: list[str], name: str) -> None:
        super().__init__(fleet, servers, name, metrics_port=free_port())
        self.name = name
        wait_for(self._answers, 60, f"{name} serving /bridges")

    def _answers(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            self.status()
        except OSError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        return bridge_status(self.metrics_port)

    def bridge(self, name: str) -> dict[str, Any]:
        return one_bridge(self.status(), name)

    def stop(self) -> None:
        """SIGTERM: the node hands its bridges over before it exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


def owned_by(node: NodeProcess, bridge: str) -> bool:
    """``node`` owns the bridge and its link is up."""
    status = node.bridge(bridge)
    return bool(status["owner"] == node.name and status["connected"])


class Setup:
    """The upstream, the bridge's identity and configuration (a new bridge name per test, so
    the module's cluster holds no consumer or lease of an earlier test for it), the nodes."""

    def __init__(self, fleet: Fleet, cluster: NatsCluster, tmp_path: Path) -> None:
        self.fleet, self.cluster = fleet, cluster
        self.name = f"central{next(_names)}"
        self.upstream: Mosquitto = upstream_mosquitto(fleet, tmp_path / "mosquitto").start()
        keystore = bridge_identity(fleet, self.name)
        allow_bridges(fleet, publish=["devices/+/commands"])
        out = (
            ("devices/+/telemetry", "sites/{site}/devices/+/telemetry"),
            ("devices/+/commands", "sites/{site}/echo/+"),  # what comes in must not go out
        )
        toml = bridge_toml(self.name, port=self.upstream.port, keystore=keystore, out=out)
        notices = bridge_toml(  # in rules only: no consumer, only the upstream subscription
            f"{self.name}-in",
            port=self.upstream.port,
            keystore=keystore,
            client_id=f"bridge-{self.name}-in",
            out=(),
            inbound=(("sites/{site}/notices/+", "devices/+/commands"),),
        )
        configure(fleet.config.home, toml, notices)
        self.nodes: list[NodeProcess] = []
        self.clients: list[Any] = []

    def node(self, name: str, server: int) -> NodeProcess:
        node = NodeProcess(self.fleet, [self.cluster.nodes[server].url], name)
        self.nodes.append(node)
        return node

    def owner(self) -> NodeProcess:
        return wait_for(
            lambda: next((n for n in self.nodes if owned_by(n, self.name)), None),
            30,
            "one node owning the bridge, connected",
        )

    def client(self, client: Any) -> Any:
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for node in self.nodes:
            node.stop()
        self.upstream.stop()


@pytest.fixture
def setup(fleet: Fleet, cluster: NatsCluster, tmp_path: Path) -> Any:
    running = Setup(fleet, cluster, tmp_path)
    yield running
    running.close()


def upstream_topic(creds: Creds) -> str:
    return f"sites/{SITE}/devices/{creds.device_id}/telemetry"


def publish_until(
    device: Publisher, stop: threading.Event, interval: float = 0.005, topic: str | None = None
) -> None:
    for n in itertools.count():
        payload = f"{device.creds.device_id}-{n:05d}".encode()
        if stop.is_set() or device.publish(payload, topic=topic) is None:
            return
        time.sleep(interval)


def kill_the_owner_mid_stream(
    setup: Setup,
    senders: list[tuple[Publisher, str | None]],
    seen: Callable[[], int],
    acked: Callable[[], int],
) -> float:
    """``senders`` publish every 5 ms (to their topic); once 200 messages are through, SIGKILL
    node-a (the owner) and wait until node-b owns the bridge and 100 more are acknowledged.
    The takeover's seconds."""
    a, b = setup.nodes
    stop = threading.Event()
    workers = [
        threading.Thread(target=publish_until, args=(s, stop, 0.005, t), daemon=True)
        for s, t in senders
    ]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: seen() >= 200, 30, "200 messages through")
        killed_at = time.monotonic()
        a.kill()
        wait_for(lambda: owned_by(b, setup.name), 30, "node-b taking the bridge over")
        takeover_s = time.monotonic() - killed_at
        after = acked()
        wait_for(lambda: acked() >= after + 100, 30, "100 more acknowledged")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    return takeover_s


def test_two_nodes_forward_each_message_once_and_commands_reach_both(
    setup: Setup, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = setup.node("node-a", 0), setup.node("node-b", 1)
    owner = setup.owner()
    other = b if owner is a else a
    assert other.bridge(setup.name)["owner"] == owner.name  # the standby knows who owns it
    assert not other.bridge(setup.name)["connected"]
    assert (
        metric(
            owner.metrics_port, "bridge_lease_held", f'bridge="{setup.name}",node="{owner.name}"'
        )
        == 1
    )
    assert (
        metric(
            other.metrics_port, "bridge_lease_held", f'bridge="{setup.name}",node="{other.name}"'
        )
        == 0
    )
    # One origin marker for the cluster: an echo is refused on any node.
    assert a.status()["origin"] == b.status()["origin"] != ""

    backend = enroll(fleet, "backend")
    up = setup.client(Subscriber(setup.upstream.port, fleet.root, backend, f"sites/{SITE}/#"))
    on_a = setup.client(Publisher(a.port, fleet.root, enroll(fleet, "d1")))
    on_b = setup.client(Publisher(b.port, fleet.root, enroll(fleet, "d2")))
    workers = [
        threading.Thread(target=device.run, args=(200, device.creds.device_id), daemon=True)
        for device in (on_a, on_b)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(on_a.acked) == len(on_b.acked) == 200
    for device in (on_a, on_b):
        topic = upstream_topic(device.creds)
        wait_for(lambda t=topic: len(up.payloads(t)) >= 200, 30, f"{topic} upstream")
    time.sleep(1.0)  # a second copy (one per node) would arrive by now
    for device in (on_a, on_b):
        assert up.payloads(upstream_topic(device.creds)) == device.acked  # once each, in order
    wait_for(lambda: a.bridge(setup.name)["queue_messages"] == 0, 10, "an empty backlog")
    assert owner.bridge(setup.name)["counters"]["forwarded"] == 400

    # In: the owner alone subscribes upstream; a command reaches its device on either node once.
    listeners = {
        f"l{i}": setup.client(
            Subscriber(n.port, fleet.root, enroll(fleet, f"l{i}"), f"devices/l{i}/commands")
        )
        for i, n in enumerate((a, b))
    }
    sender = setup.client(Publisher(setup.upstream.port, fleet.root, enroll(fleet, "backend-out")))
    assert sender.publish(b"l0", topic=f"sites/{SITE}/commands/l0") == 0  # QoS 1
    sender.client.publish(f"sites/{SITE}/commands/l1", b"l1", qos=0)
    for device, listener in listeners.items():
        wait_for(lambda s=listener, d=device: s.payloads() == [d.encode()], 15, f"{device}'s")
    wait_for(lambda: any(owned_by(n, f"{setup.name}-in") for n in (a, b)), 15, "the in bridge")
    assert sender.publish(b"notice", topic=f"sites/{SITE}/notices/l1") == 0
    wait_for(lambda: listeners["l1"].payloads() == [b"l1", b"notice"], 15, "the notice")

    # QoS 0 from a device on the standby node: forwarded once, by the owner (at most once).
    other_device = on_b if other is b else on_a
    other_device.client.publish(other_device.topic, b"qos0", qos=0)
    wait_for(lambda: b"qos0" in up.payloads(), 15, "the QoS 0 message upstream")
    time.sleep(1.0)
    assert [len(s.payloads()) for s in listeners.values()] == [1, 2]  # once each
    assert owner.bridge(setup.name)["counters"]["received"] == 2
    assert up.payloads().count(b"qos0") == 1
    # the telemetry, the three commands themselves and the QoS 0 message; no echo
    assert not [t for t, _ in up.received if "/echo/" in t]
    assert len(up.payloads()) == 404

    monkeypatch.setenv("FLEETGATE_BROKER_METRICS_PORT", str(other.metrics_port))
    result = CliRunner().invoke(app, ["--home", str(fleet.config.home), "bridge", "status"])
    assert result.exit_code == 0, result.output
    assert f"{setup.name}  DISCONNECTED" in result.output  # this node is on standby ...
    assert f"owner {owner.name}" in result.output  # ... and says who forwards

    # A clean stop hands the bridge over at once (lease deleted), not after the lease's TTL.
    stopped_at = time.monotonic()
    owner.stop()
    wait_for(lambda: owned_by(other, setup.name), 10, "the other node owning the bridge")
    handover_s = time.monotonic() - stopped_at
    print(f"handover after SIGTERM {handover_s:.1f} s")
    assert handover_s < LEASE_TTL_S


def test_the_owner_killed_mid_stream_hands_over_and_loses_no_acknowledged_message(
    setup: Setup, fleet: Fleet
) -> None:
    a = setup.node("node-a", 0)
    wait_for(lambda: owned_by(a, setup.name), 30, "node-a owning the bridge")
    b = setup.node("node-b", 1)
    backend = enroll(fleet, "backend")
    up = setup.client(Subscriber(setup.upstream.port, fleet.root, backend, f"sites/{SITE}/#"))
    on_a = setup.client(Publisher(a.port, fleet.root, enroll(fleet, "d1")))
    on_b = setup.client(Publisher(b.port, fleet.root, enroll(fleet, "d2")))
    takeover_s = kill_the_owner_mid_stream(
        setup, [(on_a, None), (on_b, None)], lambda: len(up.payloads()), lambda: len(on_b.acked)
    )
    acked = {upstream_topic(d.creds): d.acked for d in (on_a, on_b)}

    def arrived() -> bool:
        return all(set(up.payloads(t)) >= set(p) for t, p in acked.items())

    wait_for(arrived, 60, "every acknowledged message upstream")
    time.sleep(1.0)
    counts = Counter(up.received)
    duplicates = sum(c - 1 for c in counts.values())
    status = b.bridge(setup.name)
    print(
        f"acked on a {len(acked[upstream_topic(on_a.creds)])}, on b "
        f"{len(acked[upstream_topic(on_b.creds)])}; upstream {len(up.received)} "
        f"({duplicates} duplicates, {status['counters']['duplicates_out']} sent with DUP by "
        f"node-b); takeover {takeover_s:.1f} s"
    )
    assert takeover_s < LEASE_TTL_S + 10
    # at least once: a repeat is one the dead owner sent before its stream ack landed
    assert duplicates <= status["counters"]["duplicates_out"]
    wait_for(lambda: b.bridge(setup.name)["queue_messages"] == 0, 20, "an empty backlog")


def test_an_upstream_outage_keeps_messages_in_the_stream_until_it_returns(
    setup: Setup, fleet: Fleet
) -> None:
    a, b = setup.node("node-a", 0), setup.node("node-b", 2)
    owner = setup.owner()
    backend = enroll(fleet, "backend")
    up = setup.client(
        Subscriber(setup.upstream.port, fleet.root, backend, f"sites/{SITE}/#", persistent=True)
    )
    setup.upstream.stop()
    wait_for(lambda: not owner.bridge(setup.name)["connected"], 20, "the link down")
    devices = [
        setup.client(Publisher(n.port, fleet.root, enroll(fleet, f"d{i}")))
        for i, n in enumerate((a, b))
    ]
    count = 500
    workers = [
        threading.Thread(target=device.run, args=(count, device.creds.device_id), daemon=True)
        for device in devices
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [len(d.acked) for d in devices] == [count, count]  # acknowledged: in FG_MSGS
    for node in (a, b):
        wait_for(lambda n=node: n.bridge(setup.name)["queue_messages"] == 2 * count, 10, "waiting")
        assert not node.bridge(setup.name)["connected"]
    assert owner.bridge(setup.name)["last_error"]
    started = time.monotonic()
    setup.upstream.start()
    for device in devices:
        topic = upstream_topic(device.creds)
        wait_for(lambda t=topic, d=device: set(up.payloads(t)) >= set(d.acked), 60, f"{topic}")
    drained_s = time.monotonic() - started
    print(f"{2 * count} messages drained {drained_s:.1f} s after the upstream's restart")
    wait_for(lambda: a.bridge(setup.name)["queue_messages"] == 0, 20, "the backlog drained")
    for device in devices:
        assert up.payloads(upstream_topic(device.creds)) == device.acked  # once each, in order


def test_inbound_messages_the_upstream_acknowledged_survive_the_owner_killed_mid_stream(
    setup: Setup, fleet: Fleet
) -> None:
    """The owner acknowledges an inbound QoS 1 message upstream only once FG_MSGS has it: an
    owner SIGKILLed mid-stream leaves the rest with the upstream's session for the next one."""
    a = setup.node("node-a", 0)
    wait_for(lambda: owned_by(a, setup.name), 30, "node-a owning the bridge")
    b = setup.node("node-b", 1)
    listener = setup.client(
        Subscriber(b.port, fleet.root, enroll(fleet, "l1"), "devices/l1/commands", persistent=True)
    )
    sender = setup.client(Publisher(setup.upstream.port, fleet.root, enroll(fleet, "backend-out")))
    topic = f"sites/{SITE}/commands/l1"
    takeover_s = kill_the_owner_mid_stream(
        setup, [(sender, topic)], lambda: len(listener.payloads()), lambda: len(sender.acked)
    )
    acked = set(sender.acked)
    try:
        wait_for(lambda: set(listener.payloads()) >= acked, 60, "every acknowledged command")
    except AssertionError:
        missing = sorted(acked - set(listener.payloads()))
        raise AssertionError(
            f"{len(missing)} of {len(acked)} acknowledged commands missing: {missing[:30]}; "
            f"last received {listener.payloads()[-5:]}; node-b: {b.bridge(setup.name)}"
        ) from None
    time.sleep(1.0)
    received = listener.payloads()
    duplicates = len(received) - len(set(received))
    print(
        f"{len(acked)} commands acknowledged by the upstream, {len(received)} received on "
        f"node-b ({duplicates} duplicates); takeover {takeover_s:.1f} s"
    )
    assert set(received) == acked  # at least once, nothing the upstream did not take


def test_retained_messages_go_upstream_retained_and_others_do_not(
    setup: Setup, fleet: Fleet
) -> None:
    a = setup.node("node-a", 0)
    wait_for(lambda: owned_by(a, setup.name), 30, "node-a owning the bridge")
    up = setup.client(
        Subscriber(setup.upstream.port, fleet.root, enroll(fleet, "backend"), f"sites/{SITE}/#")
    )
    devices = [
        setup.client(Publisher(a.port, fleet.root, enroll(fleet, f"d{i}"))) for i in (1, 2, 3)
    ]
    # QoS 1 retained (the stream's copy), QoS 0 retained (core NATS), QoS 1 not retained
    for device, qos, retain in zip(devices, (1, 0, 1), (True, True, False), strict=True):
        device.client.publish(device.topic, device.creds.device_id.encode(), qos=qos, retain=retain)
    wait_for(lambda: len(up.payloads()) == 3, 15, "the three messages upstream")
    later = setup.client(
        Subscriber(setup.upstream.port, fleet.root, enroll(fleet, "backend-2"), f"sites/{SITE}/#")
    )
    wanted = {upstream_topic(d.creds): d.creds.device_id.encode() for d in devices[:2]}
    wait_for(lambda: len(later.received) >= 2, 15, "the retained messages for a new subscriber")
    time.sleep(0.5)
    assert dict(later.received) == wanted  # the upstream retained these two, not the third


def test_bridge_status_with_the_broker_down_reads_the_backlog_from_the_fabric(
    setup: Setup, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No queue file in fabric mode: ``bridge status`` asks the consumer, not a file that is
    not there (which would say 0 messages wait)."""
    a = setup.node("node-a", 0)
    wait_for(lambda: owned_by(a, setup.name), 30, "node-a owning the bridge")
    setup.upstream.stop()
    wait_for(lambda: not a.bridge(setup.name)["connected"], 20, "the link down")
    device = setup.client(Publisher(a.port, fleet.root, enroll(fleet, "d1")))
    device.run(20, "d1")
    assert len(device.acked) == 20
    wait_for(lambda: a.bridge(setup.name)["queue_messages"] == 20, 10, "20 waiting")
    a.kill()
    monkeypatch.setenv("FLEETGATE_BROKER_METRICS_PORT", str(a.metrics_port))  # nobody answers
    monkeypatch.setenv("FLEETGATE_FABRIC_SERVERS", setup.cluster.nodes[1].url)
    home = ["--home", str(fleet.config.home), "bridge", "status"]
    result = CliRunner().invoke(app, home)
    assert result.exit_code == 0, result.output
    print(result.output)
    assert "fabric mode: no queue file" in result.output
    assert f"backlog    20 messages (FG_MSGS consumer FG_BRIDGE_{setup.name})" in result.output
    assert "backlog    none (in rules only)" in result.output  # the -in bridge
    result = CliRunner().invoke(app, [*home, "--json"])
    report = json.loads(result.output)
    assert not report["live"] and report["fabric"]
    assert one_bridge(report, setup.name)["backlog"] == 20

    monkeypatch.setenv("FLEETGATE_FABRIC_SERVERS", f"nats://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(app, home)
    assert result.exit_code == 0, result.output
    print(result.output)
    assert "NATS: " in result.output
    assert f"backlog    unknown (in FG_MSGS consumer FG_BRIDGE_{setup.name})" in result.output
