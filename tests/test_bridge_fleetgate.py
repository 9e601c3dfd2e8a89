"""The bridge between fleetgate brokers: two bridged both ways do not loop, a revoked bridge
certificate is refused upstream and reported, and a SIGKILLed broker loses nothing."""

from __future__ import annotations

import logging
import threading
import time

from bridge_helpers import (
    SITE,
    InProcessBroker,
    Publisher,
    SubprocessBroker,
    Subscriber,
    allow_bridges,
    bridge_identity,
    bridge_toml,
    configure,
    in_order_without_gaps,
    one_bridge,
    second_home,
    upstream_mosquitto,
)
from broker_helpers import enroll, free_port, wait_for

from enrollment.registry import DeviceState
from fleetgate.config import load_config

MIRROR = (("devices/+/telemetry", "devices/+/telemetry"),)


def test_two_brokers_bridged_both_ways_deliver_each_message_once_and_do_not_loop(fleet, tmp_path):
    allow_bridges(fleet, publish=["devices/+/telemetry"])
    fleet.registry.set_acl("dashboards", publish=[], subscribe=["devices/+/telemetry"], actor="t")
    store_a, store_b = bridge_identity(fleet, "a"), bridge_identity(fleet, "b")
    port_a, port_b = free_port(), free_port()
    home_b = second_home(fleet, tmp_path)
    config_a = configure(
        fleet.config.home,
        bridge_toml("to-b", port=port_b, keystore=store_a, out=MIRROR, inbound=()),
    )
    config_b = load_config(home_b, environ={})
    (home_b / "fleetgate.toml").write_text(
        (home_b / "fleetgate.toml").read_text()
        + bridge_toml("to-a", port=port_a, keystore=store_b, out=MIRROR, inbound=())
    )
    config_b = load_config(home_b, environ={})
    a = InProcessBroker(config_a, port=port_a).start()
    b = InProcessBroker(config_b, port=port_b).start()
    watchers: list[Subscriber] = []
    try:
        for broker, name in ((a, "to-b"), (b, "to-a")):
            wait_for(lambda b=broker, n=name: one_bridge(b.status(), n)["connected"], what=name)
        on_a = Subscriber(
            a.port, fleet.root, enroll(fleet, "dash-a", group="dashboards"), "devices/+/telemetry"
        )
        on_b = Subscriber(
            b.port, fleet.root, enroll(fleet, "dash-b", group="dashboards"), "devices/+/telemetry"
        )
        watchers += [on_a, on_b]
        device = Publisher(a.port, fleet.root, enroll(fleet, "d1"))
        device.run(5, "t")
        device.close()
        wait_for(lambda: len(on_b.payloads()) >= 5, what="the messages on broker B")
        wait_for(lambda: a.status()["loops_dropped"] >= 5, what="the echoes to come back to A")
        time.sleep(2.0)  # a loop would keep delivering
        assert on_b.payloads() == device.acked  # once each at B
        assert on_a.payloads() == device.acked  # once each at A: the echoes were not routed
        assert a.status()["loops_dropped"] == 5
        assert one_bridge(a.status(), "to-b")["counters"]["forwarded"] == 5
        assert one_bridge(b.status(), "to-a")["counters"]["forwarded"] == 5  # and no more
    finally:
        for watcher in watchers:
            watcher.close()
        a.stop()
        b.stop()


def test_a_revoked_bridge_certificate_is_refused_upstream_and_reported_once_per_retry(
    fleet, caplog
):
    allow_bridges(
        fleet, publish=[f"sites/{SITE}/#", "devices/+/commands"], subscribe=[f"sites/{SITE}/#"]
    )
    upstream = InProcessBroker(fleet.config).start()  # fleetgate, no bridges of its own
    keystore = bridge_identity(fleet, "central")
    config = configure(
        fleet.config.home, bridge_toml("central", port=upstream.port, keystore=keystore)
    )
    local = InProcessBroker(config).start()
    try:
        wait_for(lambda: one_bridge(local.status(), "central")["connected"], what="the bridge")
        fleet.service.change_device(
            "bridge-central", DeviceState.REVOKED, reason="keyCompromise", actor="test"
        )
        status = wait_for(  # the live session is kicked (0x98), then reconnects are refused
            lambda: (
                "refused CONNECT" in (s := one_bridge(local.status(), "central"))["last_error"]
                and not s["connected"]
                and s
            ),
            what="the refusal to be reported",
        )
        assert "refused CONNECT: 0x87 device bridge-central is revoked" in status["last_error"]
        device = Publisher(local.port, fleet.root, enroll(fleet, "d1"))
        assert device.publish(b"kept") == 0  # still acknowledged: it waits in the queue
        device.close()
        caplog.clear()
        before = one_bridge(local.status(), "central")["counters"]["connect_failures"]
        with caplog.at_level(logging.WARNING, logger="fleetgate.broker.bridge"):
            time.sleep(3.0)
        after = one_bridge(local.status(), "central")
        attempts = after["counters"]["connect_failures"] - before
        logged = [r for r in caplog.records if "is revoked" in r.getMessage()]
        assert 1 <= attempts <= 12  # backoff (0.2 s doubling to 1 s, jittered), no tight loop
        assert abs(len(logged) - attempts) <= 1  # one log line per attempt, with the reason
        assert after["queue_messages"] == 1 and not after["connected"]
    finally:
        local.stop()
        upstream.stop()


def test_a_sigkilled_broker_forwards_every_acknowledged_message_after_restart(fleet, tmp_path):
    upstream = upstream_mosquitto(fleet, tmp_path / "mosquitto").start()
    up = Subscriber(
        upstream.port, fleet.root, enroll(fleet, "backend"), f"sites/{SITE}/#", persistent=True
    )
    keystore = bridge_identity(fleet, "central")
    sensor = enroll(fleet, "d1")
    configure(fleet.config.home, bridge_toml("central", port=upstream.port, keystore=keystore))
    broker = SubprocessBroker(fleet.config.home).start()
    acked: list[bytes] = []
    try:
        wait_for(lambda: one_bridge(broker.status(), "central")["connected"], what="the bridge")
        first = Publisher(broker.port, fleet.root, sensor)
        worker = threading.Thread(target=first.run, args=(100_000, "a"), daemon=True)
        worker.start()
        wait_for(lambda: len(first.acked) >= 200, what="traffic through the bridge")
        upstream.stop()  # from now on messages pile up in the queue
        wait_for(lambda: len(first.acked) >= 600, what="messages queued during the outage")
        broker.kill()  # mid-stream: the device is publishing as it dies
        worker.join(15)
        acked += first.acked

        broker.start()
        restarted = one_bridge(broker.status(), "central")
        assert restarted["queue_messages"] > 0  # the backlog survived the kill
        second = Publisher(broker.port, fleet.root, sensor)
        second.run(50, "b")
        second.close()
        acked += second.acked
        upstream.start()
        wait_for(
            lambda: one_bridge(broker.status(), "central")["queue_messages"] == 0,
            timeout=60,
            what="the queue to drain",
        )
        remote = f"sites/{SITE}/devices/d1/telemetry"
        wait_for(lambda: set(acked) <= set(up.payloads(remote)), timeout=30, what="every message")
        assert in_order_without_gaps(acked, up.payloads(remote))
    finally:
        up.close()
        broker.stop()
        upstream.stop()
