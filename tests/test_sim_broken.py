"""The invariant checks catch a deliberately broken deployment: a group ACL opened to every
device's telemetry, and a broker queue so small that acknowledged messages are dropped."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from firmware_sim.engine import Coordinator
from firmware_sim.observations import ACKED_DELIVERED, ACL, REASONS
from firmware_sim.scenario import parse_scenario

FLEETGATE = Path(sys.executable).with_name("fleetgate")

ACL_TOO_WIDE = """
name = "acl-too-wide"
[[groups]]
name = "sensors"
devices = 6
rate = 4.0
acl_publish = ["devices/%d/#"]
acl_subscribe = ["devices/%d/commands/#", "devices/+/telemetry"]   # the mistake

[[stages]]
name = "steady"
duration_s = 4
connect_rate = 50

[[misbehaviour]]
kind = "acl-probe"
at_s = 1
"""


def test_an_acl_opened_too_wide_fails_the_run(home, tmp_path):
    scenario = tmp_path / "acl.toml"
    scenario.write_text(ACL_TOO_WIDE)
    result = subprocess.run(
        [str(FLEETGATE), "sim", str(scenario)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"BROKEN  {ACL}" in result.stdout
    assert f"BROKEN  {REASONS}" in result.stdout
    assert "subscribe to every device's telemetry: SUBACK GRANTED_QOS_1" in result.stdout
    assert f"ok      {ACKED_DELIVERED}" in result.stdout


def test_a_tiny_broker_queue_loses_acknowledged_messages_and_the_run_says_so():
    scenario = parse_scenario(
        {
            "name": "tiny-queue",
            "drain_s": 3,
            "groups": [{"name": "sensors", "devices": 8, "rate": 10.0}],
            "stages": [{"name": "steady", "duration_s": 4, "connect_rate": 50}],
            # a dashboard that sits 100 ms on every message, with room for one in flight and
            # one queued: the broker drops the rest (and acknowledged them to the devices)
            "misbehaviour": [{"kind": "slow-subscriber", "at_s": 0.5, "ack_delay_s": 0.1}],
            "broker": {
                "limits": {
                    "groups": {
                        "sim-slow-subscribers": {"max_queued_messages": 1, "max_inflight": 1}
                    }
                }
            },
        }
    )
    result = asyncio.run(Coordinator(scenario).run())
    broken = {v.invariant: v for v in result.violations}
    assert set(broken) == {ACKED_DELIVERED}
    assert broken[ACKED_DELIVERED].count > 20
    assert all(e.startswith("slow-subscriber-0 lacks") for e in broken[ACKED_DELIVERED].examples)
