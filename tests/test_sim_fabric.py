"""The simulator on the fabric (issue 13): ``[deployment] fabric = 2`` runs a real 3-server
NATS JetStream cluster and two ``fleetgate serve broker`` nodes on it, with the devices spread
over both. One broker node SIGKILLed: its devices resume their persistent sessions on the other
node while it is down, and no acknowledged QoS 1/2 message is lost. One nats-server SIGKILLed,
and a graceful restart of a broker node: the same. The report shows each fault with its
recovery, and a real browser renders it."""

from __future__ import annotations

import asyncio
import re

from test_sim_report import PROBE, chromium

from firmware_sim.engine import Coordinator, RunResult
from firmware_sim.html_report import render
from firmware_sim.observations import RESUMED
from firmware_sim.scenario import parse_scenario

GROUPS = [
    {"name": "meters", "devices": 8, "rate": 2.0, "qos": 1, "reconnect_max_s": 1},
    {"name": "valves", "devices": 4, "rate": 2.0, "qos": 2, "reconnect_max_s": 1, "mqtt": 3},
]


def run(faults: list[dict[str, object]], steady_s: float) -> RunResult:
    scenario = parse_scenario(
        {
            "name": "fabric",
            "drain_s": 6,
            "deployment": {"fabric": 2},
            "groups": GROUPS,
            "stages": [
                {"name": "ramp", "duration_s": 3, "connect_rate": 20},
                {"name": "steady", "duration_s": steady_s},
            ],
            "faults": faults,
        }
    )
    return asyncio.run(Coordinator(scenario).run())


def test_a_killed_broker_node_s_devices_resume_on_the_other_node_and_nothing_is_lost(tmp_path):
    result = run([{"kind": "node-kill", "node": 1, "at_s": 6, "duration_s": 6}], steady_s=13)
    assert [v.line() for v in result.violations] == []
    assert result.checked_subscribers  # the backend subscriber was checked
    (mark,) = result.faults
    assert mark.label == "node-kill broker-1"
    assert 6 <= mark.end - mark.start < 30  # down 6 s, then started again and listening
    # Back (all 12 connected, full delivered rate) while node 1 was still down: on node 2.
    assert mark.recovery_s is not None and mark.recovery_s < 6
    assert all(result.obs.connected[s] == 12 for s in range(int(mark.start) + 5, int(mark.end)))
    # The devices that were on node 1 found their sessions present on node 2.
    assert result.obs.total(RESUMED) >= 1
    assert result.obs.total("acknowledged") > 200
    # The report names the fault with its recovery, and Chromium draws every plot.
    html = render(result)
    assert "node-kill broker-1" in html and f"{mark.recovery_s:.1f} s" in html
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE))
    shown = chromium("--dump-dom", "--virtual-time-budget=5000", probe.as_uri())
    title = re.search(r"<title>(.*?)</title>", shown.stdout)
    assert title, shown.stderr[-2000:]
    assert "broken" not in title.group(1) and len(title.group(1).split(",")) == 5


def test_a_killed_nats_server_and_a_restarted_node_lose_nothing():
    result = run(
        [
            {"kind": "nats-kill", "node": 1, "at_s": 5, "duration_s": 3},
            {"kind": "node-restart", "node": 2, "at_s": 14, "duration_s": 2},
        ],
        steady_s=18,
    )
    assert [v.line() for v in result.violations] == []
    marks = {m.label: m for m in result.faults}
    assert set(marks) == {"nats-kill n1", "node-restart broker-2"}
    # n1 down 3 s, then started again and the cluster healthy (every node current)
    assert marks["nats-kill n1"].end - marks["nats-kill n1"].start >= 3
    restart = marks["node-restart broker-2"]
    # its devices back on broker-1 (connected count; the delivered rate's recovery is shown in
    # the report but on a loaded machine need not settle within this short run)
    assert max(result.obs.connected[s] for s in range(int(restart.start) + 1, 21)) == 12
    assert result.obs.total(RESUMED) >= 1  # broker-2's devices, on broker-1
    assert result.obs.total("acknowledged") > 300
