"""A device whose connection is reset with a QoS 1 message in flight sends it again after the
reconnect (with its persistent session: the original packet id and DUP), as a real client does,
and the backend receives it: nothing acknowledged or sent is lost to the reset."""

from __future__ import annotations

import asyncio

from firmware_sim.engine import Coordinator
from firmware_sim.observations import RESENT
from firmware_sim.scenario import parse_scenario


def test_messages_in_flight_at_a_reset_are_sent_again_and_delivered():
    scenario = parse_scenario(
        {
            "name": "resend",
            "drain_s": 3,
            "groups": [{"name": "meters", "devices": 4, "rate": 5.0, "qos": 1}],
            "stages": [{"name": "steady", "duration_s": 7, "connect_rate": 40}],
            "faults": [
                # nothing passes from 3 s, so every device's next message waits for its PUBACK;
                # the reset at 3.5 s cuts those connections with the message unacknowledged
                {"kind": "partition", "at_s": 3, "duration_s": 1},
                {"kind": "reset", "at_s": 3.5},
            ],
        }
    )
    result = asyncio.run(Coordinator(scenario).run())
    assert result.obs.total(RESENT) >= 1
    assert [v.line() for v in result.violations] == []
    sent = result.obs.total("sent")
    assert sent - result.obs.total("acknowledged") <= 4  # at most the last one per device
