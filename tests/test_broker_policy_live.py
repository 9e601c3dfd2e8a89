"""Policy changes reach live sessions: ``fleetgate acl set`` and ``fleetgate device move`` take
effect on connected devices, on every broker sharing the registry, through the same change feed
(and so within the same latency) as a revocation kick.

A session holding a subscription (or a will) its new ACL refuses is closed: MQTT 5 is told with
DISCONNECT 0x87 and a reason string, a 3.1.1 connection is closed. A session whose
subscriptions all stay allowed goes on, its next PUBLISH judged by the new ACL. The CLI runs as
its own process, as an operator would run it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Paho,
    RunningBroker,
    enroll,
    running_broker,  # noqa: F401
    wait_for,
)
from conftest import Fleet
from postgres_server import PostgresServer
from registry_helpers import new_registry
from test_registry_postgres import pg_server  # noqa: F401 - the session's PostgreSQL server

from broker.acl import AclTemplate, bind_acl, outgrown
from enrollment.ca import init_ca
from enrollment.registry import DeviceState, Registry
from enrollment.registry.schema import upgrade
from fleetgate.config import load_config

NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98
KICK_LATENCY_S = 1.0
"""What the revocation tests promise from commit to closed session (test_broker_revocation)."""
FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))
WIDE = ("--publish", "devices/%d/#", "--subscribe", "devices/%d/commands/#")
WIDE += ("--subscribe", "devices/%d/config/#")
NARROW = ("--publish", "devices/%d/#", "--subscribe", "devices/%d/commands/#")


def cli(*args: str) -> str:
    """Run ``fleetgate`` against the test's data directory (FLEETGATE_HOME), as an operator."""
    result = subprocess.run(
        [FLEETGATE, *args], capture_output=True, text=True, timeout=60, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


class Device(Paho):
    """A paho client that also keeps the properties of the server's DISCONNECT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disconnect_properties: list[Any] = []

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnect_properties.append(props)
        super()._on_disconnect(client, userdata, flags, reason, props)

    def reason_string(self) -> str | None:
        props = self.disconnect_properties[-1] if self.disconnect_properties else None
        return getattr(props, "ReasonString", None)


def latest_change_at(registry: Registry) -> float:
    """When the newest change-feed row was committed (wall clock)."""
    at = registry.changes_since(0)[-1].at
    return (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()


@pytest.fixture
def meters(fleet):
    """Group ``meters`` may subscribe to its commands and config; ``locked`` to commands only;
    ``ops-1`` (group ``controllers``) publishes to every device's commands and config."""
    cli("acl", "set", "meters", *WIDE)
    cli("acl", "set", "locked", *NARROW)
    fleet.registry.set_acl(
        "controllers",
        publish=["devices/+/commands/#", "devices/+/config/#"],
        subscribe=[],
        actor="t",
    )
    return enroll(fleet, "ops-1", group="controllers")


# -- the one decision (pure) -------------------------------------------------------------------


def test_a_session_outgrows_an_acl_by_a_subscription_or_its_will_and_not_otherwise():
    acl = AclTemplate(("devices/%d/#",), ("devices/%d/commands/#",)).for_device("m-1")
    assert outgrown(acl, ["devices/m-1/commands/#", "devices/m-1/commands/a"], None) is None
    assert outgrown(acl, [], "devices/m-1/status") is None
    lost = outgrown(acl, ["devices/m-1/commands/#", "devices/m-1/config/#"], "elsewhere/m-1")
    assert lost is not None
    assert lost.filters == ("devices/m-1/config/#",)
    assert lost.describe("locked") == (
        "the ACL of group locked no longer allows subscription 'devices/m-1/config/#', "
        "will topic 'elsewhere/m-1'"
    )
    many = outgrown(acl, [f"x/{n}" for n in range(10)], None)
    assert many is not None and many.describe("g").endswith("7 more subscription(s)")
    assert bind_acl(None, "m-1").may_subscribe("devices/m-1/commands/x")  # the default


# -- live sessions -------------------------------------------------------------------------------


def test_narrowed_acl_closes_mqtt5_with_0x87_and_311_on_every_broker_within_the_kick_latency(
    fleet, broker, meters
):
    """m-5 (MQTT 5) on one broker, m-3 (3.1.1) on a second broker sharing the registry."""
    other = RunningBroker(fleet).start()
    try:
        creds5 = enroll(fleet, "m-5", group="meters")
        v5 = Device(broker, creds5, session_expiry=3600)
        v3 = Device(other, enroll(fleet, "m-3", group="meters"), version=V311)
        for device, device_id in ((v5, "m-5"), (v3, "m-3")):
            assert device.connect()[0] == 0
            assert device.subscribe(f"devices/{device_id}/config/#", 1) == [1]
        started = time.time()
        cli("acl", "set", "meters", *NARROW)
        committed = latest_change_at(fleet.registry)
        code, v5_closed = v5.disconnect_code(timeout=5)
        assert code == NOT_AUTHORIZED
        assert v5.reason_string() == (
            "the ACL of group meters no longer allows subscription 'devices/m-5/config/#'"
        )
        code, v3_closed = v3.disconnect_code(timeout=5)
        assert code != 0  # 3.1.1 has no DISCONNECT from a server: the connection was closed
        latencies = [v5_closed - committed, v3_closed - committed]
        print(
            "ACL committed -> sessions closed: "
            + ", ".join(f"{s * 1000:.0f} ms" for s in latencies)
            + f" (CLI started -> closed: {(max(v5_closed, v3_closed) - started) * 1000:.0f} ms)"
        )
        assert max(latencies) <= KICK_LATENCY_S
        for device in (v5, v3):
            device.close()
        other.audit_events()  # flushes that broker's audit writer; the next call this one's
        for device_id in ("m-5", "m-3"):
            [kick] = broker.audit_events(device_id, action="mqtt.policy_kick")
            assert f"'devices/{device_id}/config/#'" in kick.reason
        summaries = broker.audit_events("meters", action="mqtt.policy")  # one per broker
        text = "ACL of meters applied to 1 live session(s): 1 closed, 0 kept [node "
        assert len(summaries) == 2
        assert all(e.reason.startswith(text) for e in summaries)
        assert len({e.reason for e in summaries}) == 2  # each row names the node that wrote it
        # The stored session went with what it may no longer hold: nothing of it comes back.
        back = Device(broker, creds5, clean=False, session_expiry=3600)
        code, present, _ = back.connect()
        assert (code, present) == (0, False)
        assert back.subscribe("devices/m-5/config/#", 1) == [NOT_AUTHORIZED]
        back.close()
    finally:
        other.stop()


def test_a_session_still_allowed_keeps_going_and_its_next_publish_is_judged_by_the_new_acl(
    fleet, broker, meters
):
    device = Device(broker, enroll(fleet, "m-1", group="meters"))
    ops = Device(broker, meters)
    for client in (device, ops):
        assert client.connect()[0] == 0
    assert device.subscribe("devices/m-1/commands/#", 1) == [1]
    assert device.publish("devices/m-1/telemetry/t", b"1", qos=1) == 0  # remembered as allowed
    cli("acl", "set", "meters", "--publish", "devices/%d/status", "--subscribe", "devices/%d/#")
    wait_for(lambda: broker.audit_events("meters", action="mqtt.policy"), what="the change applied")
    [summary] = broker.audit_events("meters", action="mqtt.policy")
    assert "0 closed, 1 kept [node " in summary.reason
    assert device.publish("devices/m-1/telemetry/t", b"2", qos=1) == NOT_AUTHORIZED
    assert device.publish("devices/m-1/status", b"3", qos=1) == 0
    assert device.subscribe("devices/m-1/config/#", 1) == [1]  # newly allowed
    ops.publish("devices/m-1/commands/reboot", b"now", qos=1)
    assert device.message().topic == "devices/m-1/commands/reboot"
    assert device.events.disconnects.empty()
    for client in (device, ops):
        client.close()


def test_device_move_applies_the_new_groups_acl_live_and_is_audited(fleet, broker, meters):
    """m-1 moves to ``locked`` (loses its config subscription: closed); m-2, subscribed to its
    commands only, moves too and keeps going under ``locked``."""
    closing = Device(broker, enroll(fleet, "m-1", group="meters"), version=V5)
    staying = Device(broker, enroll(fleet, "m-2", group="meters"), version=V5)
    for device, device_id in ((closing, "m-1"), (staying, "m-2")):
        assert device.connect()[0] == 0
        assert device.subscribe(f"devices/{device_id}/commands/#", 1) == [1]
    assert closing.subscribe("devices/m-1/config/#", 1) == [1]
    assert "moved from group meters to locked" in cli("device", "move", "m-1", "--group", "locked")
    committed = latest_change_at(fleet.registry)
    code, closed_at = closing.disconnect_code(timeout=5)
    assert code == NOT_AUTHORIZED
    assert closed_at - committed <= KICK_LATENCY_S
    assert closing.reason_string() == (
        "the ACL of group locked no longer allows subscription 'devices/m-1/config/#'"
    )
    cli("device", "move", "m-2", "--group", "locked")
    wait_for(lambda: broker.audit_events("m-2", action="mqtt.policy"), what="the move applied")
    assert staying.subscribe("devices/m-2/config/#", 1) == [NOT_AUTHORIZED]
    assert staying.events.disconnects.empty()
    assert broker.call(lambda: broker.broker.core.sessions["m-2"].connection.group) == "locked"
    [moved] = broker.audit_events("m-1", action="device.move")
    assert (moved.outcome, moved.reason) == ("ok", "group meters -> locked")
    assert moved.actor.startswith("admin:")
    [kick] = broker.audit_events("m-1", action="mqtt.policy_kick")
    assert kick.actor == "device:m-1"
    [summary] = broker.audit_events("m-2", action="mqtt.policy")
    assert summary.reason.startswith(
        "device m-2 moved to group locked applied to 1 live session(s): 0 closed, 1 kept [node "
    )
    closing.close()
    staying.close()


def test_a_policy_change_is_applied_no_later_than_a_revocation_committed_after_it(
    fleet, broker, meters
):
    """One feed, read in commit order: an ACL change committed before a revoke reaches its
    session first (the broker's own audit rows say in which order it acted)."""
    narrowed = Device(broker, enroll(fleet, "m-1", group="meters"))
    revoked = Device(broker, enroll(fleet, "m-2", group="default"))
    for device in (narrowed, revoked):
        assert device.connect()[0] == 0
    assert narrowed.subscribe("devices/m-1/config/#", 1) == [1]
    fleet.registry.set_acl("meters", publish=["devices/%d/#"], subscribe=[], actor="t")
    policy_committed = latest_change_at(fleet.registry)
    fleet.service.change_device("m-2", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    kick_committed = latest_change_at(fleet.registry)
    policy_code, policy_at = narrowed.disconnect_code(timeout=5)
    kick_code, kick_at = revoked.disconnect_code(timeout=5)
    assert (policy_code, kick_code) == (NOT_AUTHORIZED, ADMINISTRATIVE_ACTION)
    policy_latency, kick_latency = policy_at - policy_committed, kick_at - kick_committed
    print(
        f"commit -> closed: policy {policy_latency * 1000:.0f} ms, "
        f"revocation {kick_latency * 1000:.0f} ms"
    )
    assert max(policy_latency, kick_latency) <= KICK_LATENCY_S
    [policy] = broker.audit_events("m-1", action="mqtt.policy_kick")
    [kick] = broker.audit_events("m-2", action="mqtt.kick")
    assert policy.id < kick.id
    narrowed.close()
    revoked.close()


def test_a_will_the_new_acl_refuses_closes_the_session_and_is_not_published(fleet, broker, meters):
    fleet.registry.set_acl("watchers", publish=[], subscribe=["devices/+/status"], actor="t")
    watcher = Device(broker, enroll(fleet, "w-2", group="watchers"))
    assert watcher.connect()[0] == 0
    assert watcher.subscribe("devices/+/status", 1) == [1]
    device = Device(
        broker, enroll(fleet, "m-1", group="meters"), will=("devices/m-1/status", b"gone", 1, False)
    )
    assert device.connect()[0] == 0
    cli("acl", "set", "meters", "--publish", "devices/%d/telemetry/#", "--subscribe", "x/%d")
    assert device.disconnect_code(timeout=5)[0] == NOT_AUTHORIZED
    assert device.reason_string() == (
        "the ACL of group meters no longer allows will topic 'devices/m-1/status'"
    )
    watcher.no_message()  # closed by the server for its policy: the will is not published
    device.close()
    watcher.close()


def test_an_admission_read_that_a_policy_change_overtakes_reads_the_registry_again(
    fleet, meters, monkeypatch
):
    """Admission in a thread (as for PostgreSQL): the read returns the old ACL, the feed applies
    the change before the verdict (no session to apply it to yet); the CONNECT must not be
    admitted under the old ACL."""
    import threading

    creds = enroll(fleet, "m-1", group="meters")
    running = RunningBroker(fleet)
    running.broker._admit_inline = False
    registry = running.broker.registry
    real = registry.admission_facts
    read, go = threading.Event(), threading.Event()

    def overtaken(device_id: str, serial: int | None) -> Any:
        facts = real(device_id, serial)
        if not read.is_set():
            read.set()
            assert go.wait(10)
        return facts

    monkeypatch.setattr(registry, "admission_facts", overtaken)
    running.start()
    try:
        device = Device(running, creds)
        device.start()
        assert read.wait(10)
        cursor = running.broker.feed.cursor
        fleet.registry.set_acl("meters", publish=["devices/%d/#"], subscribe=[], actor="t")
        feed = running.broker.feed
        wait_for(lambda: feed.policy_changed_since("m-1", "meters", cursor), what="the feed")
        go.set()
        assert device.events.connack.get(timeout=10)[0] == 0
        assert device.subscribe("devices/m-1/config/#", 1) == [NOT_AUTHORIZED]
        device.close()
    finally:
        go.set()
        running.stop()


# -- the registry's side -------------------------------------------------------------------------


def test_revision_0003_keeps_the_state_changes_already_in_the_feed(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url, "0002")
    with sqlite3.connect(tmp_path / "r.db") as db:
        db.execute(
            "INSERT INTO devicechange (device_id, state, reason, at) "
            "VALUES ('d1', 'REVOKED', 'keyCompromise', '2026-12-01 10:00:00')"
        )
    upgrade(url)
    registry = Registry(url)
    try:
        [old] = registry.changes_since(0)
        assert (old.device_id, old.state, old.group) == ("d1", DeviceState.REVOKED, None)
        registry.set_acl("g", publish=["a/%d"], subscribe=[], actor="t")
        new = registry.changes_since(old.id or 0)
        assert [(c.device_id, c.state, c.group, c.reason) for c in new] == [
            (None, None, "g", "acl.set")
        ]
    finally:
        registry.close()


# -- PostgreSQL ------------------------------------------------------------------------------------

_fleets = itertools.count(1)


@pytest.fixture
def pg_fleet(home: Path, pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Fleet:  # noqa: F811
    """A data directory whose registry is a fresh PostgreSQL database (the CLI's too)."""
    url = pg_server.create_database(f"policy_live_{next(_fleets)}")
    monkeypatch.setenv("FLEETGATE_DATABASE_URL", url)
    config = load_config(home)
    init_ca(config)
    new_registry(config.database_url).close()
    return Fleet(config)


def test_on_postgresql_acl_set_and_device_move_reach_live_sessions_within_the_kick_latency(
    pg_fleet: Fleet,
) -> None:
    """Admission and the feed read PostgreSQL in threads; same promises as on SQLite."""
    fleet = pg_fleet
    cli("acl", "set", "meters", *WIDE)
    cli("acl", "set", "locked", *NARROW)
    creds = [enroll(fleet, f"m-{n}", group="meters") for n in (1, 2)]
    broker = RunningBroker(fleet).start()
    try:
        first, second = (Device(broker, c) for c in creds)
        for device, device_id in ((first, "m-1"), (second, "m-2")):
            assert device.connect()[0] == 0
            assert device.subscribe(f"devices/{device_id}/config/#", 1) == [1]
        cli("acl", "set", "meters", "--publish", "devices/%d/#", "--subscribe", "devices/%d/#")
        wait_for(lambda: broker.audit_events("meters", action="mqtt.policy"), what="applied")
        assert first.events.disconnects.empty() and second.events.disconnects.empty()
        cli("device", "move", "m-1", "--group", "locked")
        committed = latest_change_at(fleet.registry)
        code, closed_at = first.disconnect_code(timeout=5)
        latency = closed_at - committed
        print(f"PostgreSQL: move committed -> session closed: {latency * 1000:.0f} ms")
        assert code == NOT_AUTHORIZED and latency <= KICK_LATENCY_S
        assert second.publish("devices/m-2/anything", b"x", qos=1) == 0  # still meters' ACL
        first.close()
        second.close()
    finally:
        broker.stop()
