"""The bridge against Debian's Mosquitto as the upstream, client certificates required:
topics renamed both ways, a 30 s upstream outage, a full queue."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from bridge_helpers import (
    SITE,
    InProcessBroker,
    Publisher,
    Subscriber,
    allow_bridges,
    bridge_identity,
    bridge_toml,
    configure,
    in_order_without_gaps,
    metric,
    one_bridge,
    upstream_mosquitto,
)
from broker_helpers import enroll, wait_for
from typer.testing import CliRunner

from broker.bridge import ORIGIN_PROPERTY
from broker.bridge.status import FULL_QUIET_S
from enrollment.cli import app


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_telemetry_goes_up_and_commands_come_down_renamed_and_inside_the_local_acl(
    fleet, tmp_path, monkeypatch, protocol
):
    upstream = upstream_mosquitto(fleet, tmp_path / "mosquitto").start()
    keystore = bridge_identity(fleet, "central")
    allow_bridges(fleet, publish=["devices/+/commands"])
    sensor, listener = enroll(fleet, "d1"), enroll(fleet, "d2")
    backend_in, backend_out = enroll(fleet, "backend-in"), enroll(fleet, "backend-out")
    config = configure(
        fleet.config.home,
        bridge_toml(
            "central",
            port=upstream.port,
            keystore=keystore,
            protocol=protocol,
            inbound=(
                ("sites/{site}/commands/+", "devices/+/commands"),
                ("sites/{site}/admin/+", "admin/+"),  # renamed outside the bridge's local ACL
            ),
        ),
    )
    broker = InProcessBroker(config).start()
    subscribers: list[Subscriber] = []
    try:
        wait_for(lambda: one_bridge(broker.status(), "central")["connected"], what="the bridge")
        up = Subscriber(upstream.port, fleet.root, backend_in, f"sites/{SITE}/#")
        commands = Subscriber(broker.port, fleet.root, listener, "devices/d2/commands")
        subscribers += [up, commands]
        device = Publisher(broker.port, fleet.root, sensor)
        device.run(20, "t")
        assert len(device.acked) == 20
        remote = f"sites/{SITE}/devices/d1/telemetry"
        wait_for(lambda: len(up.payloads(remote)) >= 20, what="telemetry upstream")
        assert up.payloads(remote) == device.acked  # renamed, all there, in order
        origin = broker.status()["origin"]
        marker = (ORIGIN_PROPERTY, origin)
        carried = [marker in (getattr(p, "UserProperty", None) or []) for p in up.properties]
        assert all(carried) if protocol == "5" else not any(carried)

        backend = Publisher(upstream.port, fleet.root, backend_out, version=mqtt.MQTTv311)
        assert backend.publish(b"reboot", topic=f"sites/{SITE}/commands/d2") == 0
        assert backend.publish(b"wipe", topic=f"sites/{SITE}/admin/d2") == 0
        wait_for(lambda: commands.payloads("devices/d2/commands") == [b"reboot"], what="command")
        status = wait_for(
            lambda: (
                (s := one_bridge(broker.status(), "central"))["counters"]["inbound_denied"] and s
            ),
            what="the admin message to be refused by the bridge's ACL",
        )
        assert status["counters"]["received"] == 1
        assert status["counters"]["forwarded"] == 20
        assert status["queue_messages"] == 0
        backend.close()
        device.close()

        monkeypatch.setenv("FLEETGATE_BROKER_METRICS_PORT", str(broker.metrics_port))
        result = CliRunner().invoke(app, ["--home", str(fleet.config.home), "bridge", "status"])
        assert result.exit_code == 0, result.output
        assert "central  connected since" in result.output
        assert "forwarded  20" in result.output
    finally:
        for subscriber in subscribers:
            subscriber.close()
        broker.stop()
        upstream.stop()


def test_a_30_s_upstream_outage_loses_no_acknowledged_message_and_keeps_per_topic_order(
    fleet, tmp_path
):
    upstream = upstream_mosquitto(fleet, tmp_path / "mosquitto").start()
    keystore = bridge_identity(fleet, "central")
    devices = [enroll(fleet, f"d{n}") for n in range(3)]
    config = configure(
        fleet.config.home, bridge_toml("central", port=upstream.port, keystore=keystore)
    )
    broker = InProcessBroker(config).start()
    up = Subscriber(
        upstream.port, fleet.root, enroll(fleet, "backend"), f"sites/{SITE}/#", persistent=True
    )
    publishers = [Publisher(broker.port, fleet.root, creds) for creds in devices]
    stop = threading.Event()

    def publish(device: Publisher) -> None:
        n = 0
        while not stop.is_set():
            device.publish(f"{device.creds.device_id}-{n:05d}".encode())
            n += 1
            time.sleep(0.01)

    workers = [threading.Thread(target=publish, args=(p,), daemon=True) for p in publishers]
    try:
        wait_for(lambda: one_bridge(broker.status(), "central")["connected"], what="the bridge")
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        upstream.stop()  # mid-stream
        time.sleep(30.0)
        during = one_bridge(broker.status(), "central")
        assert not during["connected"]
        assert during["queue_messages"] > 100
        assert during["oldest_age_s"] > 20
        assert during["last_error"]
        upstream.start()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join(15)
        wait_for(
            lambda: one_bridge(broker.status(), "central")["queue_messages"] == 0,
            timeout=60,
            what="the queue to drain",
        )
        total = sum(len(p.acked) for p in publishers)
        for device in publishers:
            remote = f"sites/{SITE}/devices/{device.creds.device_id}/telemetry"
            wait_for(
                lambda remote=remote, device=device: set(device.acked) <= set(up.payloads(remote)),
                timeout=30,
                what=f"every message of {device.creds.device_id} upstream",
            )
            assert in_order_without_gaps(device.acked, up.payloads(remote)), (
                f"{device.creds.device_id}: acknowledged messages missing or reordered"
            )
        after = one_bridge(broker.status(), "central")
        assert after["connected"]
        assert after["counters"]["forwarded"] >= total
        # every duplicate the bridge caused upstream was counted as one
        assert up.repeats_not_redelivered() <= after["duplicates"]
    finally:
        stop.set()
        for device in publishers:
            device.close()
        up.close()
        broker.stop()
        upstream.stop()


def test_a_full_queue_refuses_with_0x97_or_an_unacknowledged_close_and_drops_nothing(
    fleet, tmp_path
):
    upstream = upstream_mosquitto(fleet, tmp_path / "mosquitto").start()
    up = Subscriber(
        upstream.port, fleet.root, enroll(fleet, "backend"), f"sites/{SITE}/#", persistent=True
    )
    upstream.stop()  # the subscriber's session waits in Mosquitto's persistence
    keystore = bridge_identity(fleet, "central")
    config = configure(
        fleet.config.home,
        bridge_toml("central", port=upstream.port, keystore=keystore, queue_max_messages=20),
    )
    broker = InProcessBroker(config).start()
    v5 = Publisher(broker.port, fleet.root, enroll(fleet, "d5"))
    v3 = Publisher(broker.port, fleet.root, enroll(fleet, "d3"), version=mqtt.MQTTv311)
    try:
        codes = [v5.publish(f"m-{n:03d}".encode()) for n in range(25)]
        assert codes == [0] * 20 + [0x97] * 5
        assert v3.publish(b"v3-refused") is None  # closed without a PUBACK: not acknowledged
        status = one_bridge(broker.status(), "central")
        assert status["queue_full"] and status["queue_messages"] == 20
        assert status["counters"]["refused_full"] == 6
        assert metric(broker.metrics_port, "bridge_queue_full", 'bridge="central"') == 1
        assert (
            metric(broker.metrics_port, "bridge_refused_queue_full_total", 'bridge="central"') == 6
        )

        upstream.start()
        remote = f"sites/{SITE}/devices/d5/telemetry"
        wait_for(lambda: len(up.payloads(remote)) >= 20, timeout=30, what="the queued messages")
        assert in_order_without_gaps(v5.acked, up.payloads(remote))
        assert b"v3-refused" not in up.payloads()
        wait_for(  # the alarm ends once nothing was refused for FULL_QUIET_S
            lambda: not one_bridge(broker.status(), "central")["queue_full"],
            timeout=FULL_QUIET_S + 20,
            what="room",
        )
        assert v5.publish(b"after") == 0
    finally:
        v5.close()
        up.close()
        broker.stop()
        upstream.stop()
