"""The tick's deadlines (a heap, driven by a clock the test turns) and the GC policy's hook.

The tick looks only at what is due: these tests count what it touches, and check that a
deadline moved by traffic (a PINGREQ) or cancelled (a reconnect, a close) is honoured.
"""

from __future__ import annotations

import gc

from broker.connection import Connection
from broker.core import BrokerCore, CoreSettings
from broker.gcpolicy import GcPolicy
from broker.metrics import Metrics
from broker.mqtt import PingReq, Properties
from broker.timers import Deadlines
from tests.test_broker_core import Client, watch, will


def test_deadlines_come_due_in_order_and_only_once() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.schedule("b", 2.0)
    deadlines.schedule("a", 1.0)
    deadlines.schedule("c", 3.0)
    assert deadlines.next_deadline() == 1.0
    assert deadlines.due(0.5) == []
    assert deadlines.due(2.0) == ["a", "b"]
    assert deadlines.due(2.0) == []
    assert len(deadlines) == 1 and "c" in deadlines


def test_a_rescheduled_or_cancelled_key_keeps_only_its_latest_deadline() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.schedule("a", 1.0)
    deadlines.schedule("a", 5.0)  # later: the old entry is stale
    deadlines.schedule("b", 1.0)
    deadlines.cancel("b")
    assert deadlines.due(4.0) == []
    assert deadlines.next_deadline() == 5.0
    assert deadlines.due(5.0) == ["a"]
    assert deadlines.next_deadline() is None


def test_stale_entries_are_bounded_by_rebuilding() -> None:
    deadlines: Deadlines[int] = Deadlines()
    for key in range(100):
        deadlines.schedule(key, 1000.0)
    for step in range(10_000):
        deadlines.schedule(step % 100, 1000.0 + step)
    assert len(deadlines._heap) <= 100 + 1024 + 1
    assert sorted(deadlines.due(20_000.0)) == list(range(100))


def test_tick_touches_only_connections_whose_deadline_came() -> None:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    clients = [Client(core, f"d{i}") for i in range(50)]
    for client in clients:
        client.connect(keep_alive=60)
    assert len(core.connection_deadlines) == 50
    checked: list[object] = []
    due = core.connection_deadlines.due

    def recorded(now: float) -> list[Connection]:
        found = due(now)
        checked.extend(found)
        return found

    core.connection_deadlines.due = recorded  # type: ignore[method-assign]
    clients[0].send(PingReq(), now=80.0)  # moves d0's deadline from 90 to 170
    core.tick(10.0)
    assert checked == []
    core.tick(90.0)  # all at their first deadline (d0 moves on to 170); none yet past it
    assert len(checked) == 50 and not clients[1].conn.closing
    core.tick(90.5)
    assert all(c.conn.closing for c in clients[1:]) and not clients[0].conn.closing
    assert len(core.connection_deadlines) == 1


def test_a_closed_connection_leaves_the_deadlines() -> None:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    client = Client(core, "d1")
    client.connect(keep_alive=60)
    client.conn.connection_lost(now=1.0)
    assert len(core.connection_deadlines) == 0


def test_away_sessions_are_due_at_their_will_then_their_expiry() -> None:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    watcher = watch(core)
    device = Client(core, "d1")
    device.connect(will=will(delay=10), properties=Properties(session_expiry_interval=60))
    device.conn.connection_lost(now=100.0)
    assert core.session_deadlines.next_deadline() == 110.0
    core.tick(110.0)
    assert len(watcher.received()) == 1
    assert core.session_deadlines.next_deadline() == 160.0  # then its expiry
    core.tick(160.0)
    assert "d1" not in core.sessions and len(core.session_deadlines) == 0


def test_a_session_that_comes_back_is_no_longer_due() -> None:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    device = Client(core, "d1")
    device.connect(properties=Properties(session_expiry_interval=60))
    device.conn.connection_lost(now=0.0)
    assert len(core.session_deadlines) == 1
    again = Client(core, "d1", now=5.0)
    assert again.connect(5.0, clean_start=False).session_present
    assert len(core.session_deadlines) == 0
    core.tick(60.0)  # past the expiry it had while away
    assert core.sessions["d1"].connection is again.conn


def test_gc_policy_times_collections_and_reports_them() -> None:
    policy = GcPolicy(settle_s=1.0)
    policy.install()
    try:
        gc.collect()
        assert policy.pauses.count[2] >= 1 and policy.pauses.worst_s[2] > 0
        policy.settle(0.0)  # the first call only starts the period
        policy.settle(1.0)
        assert gc.get_freeze_count() > 0
        text = Metrics.render_gc(
            policy.pauses.count, policy.pauses.worst_s, policy.pauses.total_s, 0
        )
        assert 'fleetgate_broker_gc_pause_seconds_max{generation="2"}' in text
        assert 'fleetgate_broker_gc_collections_total{generation="0"}' in text
    finally:
        policy.uninstall()
        gc.unfreeze()


def _cycles(count: int) -> list[list[object]]:
    made: list[list[object]] = []
    for _ in range(count):
        cycle: list[object] = []
        cycle.append(cycle)
        made.append(cycle)
    return made


def test_gc_policy_frees_dead_frozen_cycles_once_the_frozen_set_regrew() -> None:
    policy = GcPolicy(settle_s=1.0, regrowth=0.5)
    policy.install()
    try:
        base = gc.get_freeze_count()
        first = _cycles(base * 4 // 10)
        policy.settle(0.0)  # the first call only starts the period
        policy.settle(1.0)  # grew by 40 %: frozen as they are
        assert policy.pauses.refreezes == 0 and gc.get_freeze_count() >= 1.4 * base
        first.clear()  # dead, but a frozen cycle is not freed until unfrozen
        second = _cycles(base * 4 // 10)
        policy.settle(2.0)  # frozen set at 180 %: unfrozen, collected in full, refrozen
        assert policy.pauses.refreezes == 1
        assert gc.get_freeze_count() < 1.6 * base
        assert len(second) == base * 4 // 10
    finally:
        policy.uninstall()
        gc.unfreeze()
