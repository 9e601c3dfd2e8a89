"""Scenario files and the invariant checks, without I/O: TOML in, dataclasses or a named error
out; observations in, the broken invariants out."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_sim.observations import (
    ACKED_DELIVERED,
    ACL,
    ORDER,
    REASONS,
    RENEWED,
    REVOKED_SILENT,
    Observations,
    Renewal,
    check_invariants,
    recovery_time,
)
from firmware_sim.scenario import (
    DEFAULT,
    FaultKind,
    Misbehaviour,
    ScenarioError,
    load_scenario,
    parse_scenario,
    resized,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scenarios"

MINIMAL = {
    "groups": [{"name": "sensors", "devices": 10}],
    "stages": [{"name": "steady", "duration_s": 10}],
}


def with_(**changes):
    return {**MINIMAL, **changes}


def test_every_example_scenario_parses_and_names_its_faults():
    scenarios = {p.stem: load_scenario(p) for p in sorted(EXAMPLES.glob("*.toml"))}
    assert set(scenarios) == {
        "broker-outage-renewals",
        "fabric-node-failure",
        "hardware-line",
        "production-line-wave",
        "revocation-storm",
    }
    outage = scenarios["broker-outage-renewals"]
    assert {f.kind for f in outage.faults} >= {FaultKind.BROKER_KILL, FaultKind.RENEWAL_WAVE}
    assert outage.needs_proxy()
    storm = scenarios["revocation-storm"]
    assert [f.percent for f in storm.faults if f.kind == FaultKind.REVOKE] == [20.0]
    fabric = scenarios["fabric-node-failure"]
    assert (fabric.deployment.fabric, fabric.deployment.nats_nodes) == (2, 3)
    assert [f.label for f in fabric.faults] == ["node-kill broker-1", "nats-kill n2"]
    assert "[deployment] fabric" in fabric.needs_services()
    line = scenarios["production-line-wave"]
    assert line.group("gateways").mqtt == 3 and line.group("gateways").qos == 2
    assert line.stages[0].connect_rate == 25


def test_a_minimal_scenario_takes_its_defaults():
    scenario = parse_scenario(MINIMAL, default_name="mine")
    assert scenario.name == "mine"
    assert scenario.duration_s == 10
    group = scenario.groups[0]
    assert (group.rate, group.qos, group.mqtt, group.persistent) == (1.0, 1, 5, True)
    assert scenario.stage_at(3).name == "steady"
    assert scenario.needs_services() == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (with_(colour="red"), "unknown key(s) at the top level: colour"),
        (
            with_(groups=[{"name": "s", "devices": 1, "qos": 3}]),
            "group 's': qos must be 0, 1 or 2",
        ),
        (with_(groups=[{"name": "s", "devices": "ten"}]), "devices = 'ten': expected a whole"),
        (with_(groups=[{"devices": 1}]), "[[groups]] #1: missing name"),
        (with_(groups=[{"name": "s", "devices": 1, "speed": 2}]), "unknown key(s) speed"),
        (
            with_(groups=[{"name": "s", "devices": 30, "key_store": "tpm"}]),
            "a tpm line has at most 20 devices",
        ),
        (with_(groups=[{"name": "s", "devices": 1, "key_store": "hsm"}]), "expected one of"),
        (with_(stages=[]), "at least one [[stages]] is needed"),
        (
            with_(stages=[{"name": "x", "duration_s": 5, "groups": ["nope"]}]),
            "stage 'x': no group 'nope'",
        ),
        (
            with_(faults=[{"kind": "broker-kill", "at_s": 50}]),
            "at_s must fall inside the run (0 .. 10 s)",
        ),
        (
            with_(faults=[{"kind": "revoke", "at_s": 5, "group": "sensors", "percent": 0}]),
            "percent must be in 0 .. 100",
        ),
        (
            with_(faults=[{"kind": "impair", "at_s": 1, "duration_s": 2, "jitter_ms": 5}]),
            "jitter_ms must be <= delay_ms",
        ),
        (
            with_(faults=[{"kind": "upstream-outage", "at_s": 1, "duration_s": 2}]),
            "needs a [bridge] (its upstream)",
        ),
        (with_(bridge={"upstream": "hivemq"}), "expected one of ['mosquitto']"),
        (with_(bridge={"port": 1883}), "[bridge]: the simulator sets port itself"),
        (
            with_(faults=[{"kind": "node-kill", "at_s": 1, "duration_s": 2}]),
            "needs a fabric deployment ([deployment] fabric = 2)",
        ),
        (
            with_(
                deployment={"fabric": 2},
                faults=[{"kind": "node-kill", "at_s": 1, "node": 3}],
            ),
            "node must be 1 .. 2",
        ),
        (
            with_(
                deployment={"fabric": 2, "nats_nodes": 3},
                faults=[{"kind": "nats-restart", "at_s": 1, "node": 4}],
            ),
            "node must be 1 .. 3",
        ),
        (with_(deployment={"fabric": 2, "brokers": 2}), "[deployment]: unknown key(s) brokers"),
        (with_(deployment={"fabric": -1}), "[deployment] fabric: 0 (one broker) .. 8"),
        (with_(misbehaviour=[{"kind": "teleport"}]), "kind = 'teleport': expected one of"),
        (with_(broker=[1]), "[broker] must be a table"),
    ],
)
def test_a_bad_scenario_is_refused_with_where_and_what(table, message):
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(table)
    assert message in str(caught.value)


def test_a_file_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("groups = [\n")
    with pytest.raises(ScenarioError, match=r"broken\.toml: not valid TOML"):
        load_scenario(path)


def test_what_only_the_in_process_mode_can_do_is_named():
    scenario = parse_scenario(
        with_(
            faults=[
                {"kind": "broker-kill", "at_s": 1, "duration_s": 1},
                {"kind": "impair", "at_s": 2, "duration_s": 1, "delay_ms": 10},
            ],
            misbehaviour=[{"kind": "expired-certificate"}, {"kind": Misbehaviour.FLOOD.value}],
            broker={"max_packet_size": 1000},
        )
    )
    assert scenario.needs_services() == [
        "fault broker-kill",
        "misbehaviour expired-certificate",
        "[broker] settings",
    ]


def test_resizing_keeps_the_groups_proportions():
    scenario = parse_scenario(
        with_(groups=[{"name": "a", "devices": 30}, {"name": "b", "devices": 10}])
    )
    assert [g.devices for g in resized(scenario, 400).groups] == [300, 100]
    assert resized(DEFAULT, 7).devices == 7


# -- invariants ----------------------------------------------------------------------------------

BACKEND = "backend"
TOPIC = "devices/d1/telemetry"


def observed(acked=(0, 1, 2), arrived=(0, 1, 2)):
    obs = Observations()
    obs.subscribers[BACKEND] = ("devices/+/telemetry",)
    for seq in acked:
        obs.acknowledged(TOPIC, seq, 1.0, sent=1.0)
    for seq in arrived:
        obs.delivered(BACKEND, TOPIC, seq, 1.0, 1.01)
    return obs


def broken(obs):
    return {v.invariant: v for v in check_invariants(obs, checked_subscribers=(BACKEND,))}


def test_a_clean_run_breaks_nothing_and_duplicates_are_allowed():
    assert broken(observed(arrived=(0, 1, 1, 2))) == {}


def test_an_acknowledged_message_that_never_arrived_is_lost():
    violation = broken(observed(arrived=(0, 2)))[ACKED_DELIVERED]
    assert violation.count == 1
    assert violation.examples == ("backend lacks devices/d1/telemetry #1",)


def test_messages_sent_before_a_subscriber_subscribed_are_not_due_to_it():
    obs = observed(arrived=())  # #0..#2 were sent at 1.0 s
    obs.subscribed_at[BACKEND] = 1.5
    obs.acknowledged(TOPIC, 3, 2.0, sent=2.0)
    assert broken(obs)[ACKED_DELIVERED].examples == ("backend lacks devices/d1/telemetry #3",)
    obs.delivered(BACKEND, TOPIC, 3, 2.0, 2.01)
    assert broken(obs) == {}


def test_messages_sent_while_a_restarted_broker_had_lost_the_subscription_are_not_due():
    obs = observed(arrived=(0, 1, 2))
    obs.acknowledged(TOPIC, 3, 5.0, sent=5.0)  # before the kill at 6 s: lost with the broker
    obs.acknowledged(TOPIC, 4, 9.5, sent=9.5)  # restarted, not subscribed again until 10 s
    obs.acknowledged(TOPIC, 5, 10.5, sent=10.5)  # after the new subscription: due
    obs.unsubscribed[BACKEND] = [(6.0, 10.0)]
    violation = broken(obs)[ACKED_DELIVERED]
    assert violation.count == 2
    assert violation.examples == ("backend lacks devices/d1/telemetry #3 and 1 more",)
    other = Observations()
    other.unsubscribed[BACKEND] = [(20.0, 21.0)]
    obs.merge(other)
    assert obs.unsubscribed[BACKEND] == [(6.0, 10.0), (20.0, 21.0)]


def test_a_reordered_message_breaks_order():
    assert broken(observed(arrived=(0, 2, 1)))[ORDER].examples == (
        "backend got devices/d1/telemetry #1 after #2",
    )


def test_a_revoked_device_heard_after_its_kick_or_after_the_grace_is_caught():
    obs = observed()
    obs.delivered(BACKEND, TOPIC, 3, 5.0, 5.01)
    obs.acknowledged(TOPIC, 3, 5.0, sent=5.0)
    obs.kicked["d1"] = 4.0
    assert broken(obs)[REVOKED_SILENT].count == 1
    del obs.kicked["d1"]
    obs.revoked_at["d1"] = 4.0  # never kicked: counts as kicked 2 s after the revocation
    assert REVOKED_SILENT not in broken(obs)
    obs.revoked_at["d1"] = 2.0
    assert REVOKED_SILENT in broken(obs)


def test_a_device_that_hears_another_devices_topic_is_an_acl_crossing():
    obs = observed()
    obs.subscribers["d2"] = ("devices/d2/commands/#", "devices/+/telemetry")
    obs.delivered("d2", TOPIC, 0, 1.0, 1.01)
    assert broken(obs)[ACL].examples == ("d2 received devices/d1/telemetry",)


def test_a_renewal_after_expiry_or_never_is_late():
    obs = observed()
    obs.renewals += [
        Renewal("d1", not_after=10.0, done_at=9.0),
        Renewal("d2", not_after=10.0, done_at=11.5),
        Renewal("d3", not_after=10.0, error="EstError: 503"),
    ]
    violation = broken(obs)[RENEWED]
    assert violation.count == 2
    assert violation.examples == (
        "d2 renewed 1.5 s after expiry",
        "d3 never renewed (EstError: 503)",
    )


def test_a_refusal_with_another_reason_than_expected_is_reported():
    obs = observed()
    obs.answered("probe", "subscribe", "SUBACK NOT_AUTHORIZED", ("SUBACK NOT_AUTHORIZED",))
    obs.answered("probe", "subscribe", "SUBACK GRANTED_QOS_1", ("SUBACK NOT_AUTHORIZED",))
    assert broken(obs)[REASONS].examples == (
        "probe subscribe: SUBACK GRANTED_QOS_1 (expected SUBACK NOT_AUTHORIZED)",
    )


def test_merging_shards_adds_up():
    one, two = observed(acked=(0,), arrived=()), observed(acked=(), arrived=(0,))
    one.connected[3] = 4
    two.connected[3] = 5
    one.merge(two)
    assert one.connected[3] == 9
    assert broken(one) == {}


def test_recovery_is_when_connected_and_rate_are_back():
    obs = Observations()
    for second in range(20):
        down = 10 <= second < 14
        obs.connected[second] = 0 if down else 100
        obs.counts["delivered"][second] = 0 if down else 100
    assert recovery_time(obs, 10.0, 11.0) == 4.0
    obs.connected[15] = 90  # still short of 95 % at 15 s
    assert recovery_time(obs, 10.0, 11.0) == 6.0
    assert recovery_time(obs, 10.0, 11.0, keep=0.9) == 4.0


def test_a_stage_the_simulator_could_not_keep_pace_with_is_noted():
    from firmware_sim.engine import pace_notes

    scenario = parse_scenario(MINIMAL)  # 10 devices at 1 msg/s for 10 s
    obs = Observations()
    for second in range(10):
        obs.connected[second] = 10
        obs.counts["sent"][second] = 10
    assert pace_notes(scenario, obs) == []
    for second in range(10):
        obs.counts["sent"][second] = 5
    assert pace_notes(scenario, obs) == [
        "stage steady: the devices published 50% of the asked rate (5 of 10 msg/s): "
        "acknowledgements held back by a fault, or a simulator short of CPU "
        "(try --procs, or a less loaded machine)"
    ]
