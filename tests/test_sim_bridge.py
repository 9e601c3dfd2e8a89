"""A scenario with a ``[bridge]`` (issue 13): the simulator starts Mosquitto as the upstream,
the broker bridges every device's telemetry to it, and a subscriber there is a checked
subscriber. The upstream is stopped for 4 s: the bridge queues and catches up, and every
message acknowledged to a device reaches the upstream, with one broker or on a fabric of two
nodes (each running the bridge, one forwarding it). With a bridge queue too small for the
outage the broker refuses publishes (0x97) instead, and still loses nothing it acknowledged."""

from __future__ import annotations

import asyncio

import pytest

from firmware_sim.engine import Coordinator, RunResult
from firmware_sim.observations import REASONS, lost_messages
from firmware_sim.scenario import parse_scenario
from firmware_sim.upstream import UPSTREAM_SUBSCRIBER


def run(bridge: dict[str, object], **more: object) -> RunResult:
    scenario = parse_scenario(
        {
            "name": "bridge",
            "drain_s": 6,
            "bridge": bridge,
            **more,
            "groups": [
                {"name": "meters", "devices": 8, "rate": 2.0, "qos": 1, "reconnect_max_s": 1},
                {"name": "valves", "devices": 4, "rate": 2.0, "qos": 2, "reconnect_max_s": 1},
            ],
            "stages": [
                {"name": "ramp", "duration_s": 3, "connect_rate": 20},
                {"name": "steady", "duration_s": 12},
            ],
            "faults": [{"kind": "upstream-outage", "at_s": 5, "duration_s": 4}],
        }
    )
    return asyncio.run(Coordinator(scenario).run())


@pytest.mark.parametrize("fabric", [0, 2], ids=["one broker", "fabric of 2"])
def test_every_acknowledged_message_reaches_the_upstream_across_its_outage(fabric: int) -> None:
    """On the fabric every node runs the bridge and one forwards it, from ``FG_MSGS``."""
    result = run({"upstream": "mosquitto"}, deployment={"fabric": fabric})
    assert [v.line() for v in result.violations] == []
    assert UPSTREAM_SUBSCRIBER in result.checked_subscribers
    assert lost_messages(result.obs, (UPSTREAM_SUBSCRIBER,)) == 0
    upstream = sum(
        len(s) for (sub, _), s in result.obs.arrivals.items() if sub == UPSTREAM_SUBSCRIBER
    )
    assert upstream >= result.obs.total("acknowledged") > 200
    (mark,) = result.faults
    assert mark.label == "upstream-outage" and mark.end - mark.start >= 4
    # what was sent during the outage waited in the bridge's queue: seconds late upstream
    after = range(int(mark.end), int(mark.end) + 3)
    assert max(max(result.obs.latency_ms[s], default=0) for s in after) > 2500
    assert mark.recovery_s is not None


def test_a_bridge_queue_too_small_for_the_outage_refuses_publishes_and_loses_nothing() -> None:
    """The broker's answer to a full bridge queue is backpressure, not loss: PUBACK 0x97 to
    the devices (an unexpected refusal for an ordinary device, so the run is red), and every
    message it did acknowledge still reaches the upstream."""
    result = run({"upstream": "mosquitto", "queue_max_messages": 5})
    broken = {v.invariant: v for v in result.violations}
    assert set(broken) == {REASONS}
    examples = broken[REASONS].examples
    assert all("PUBACK QUOTA_EXCEEDED" in e for e in examples), examples
    assert set(result.obs.refusals) == {"PUBACK QUOTA_EXCEEDED"}
    assert lost_messages(result.obs, (UPSTREAM_SUBSCRIBER,)) == 0
    assert lost_messages(result.obs, ("backend",)) == 0
