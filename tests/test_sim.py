"""`fleetgate sim`: a scenario against real services on a throw-away data directory, and a
report that adds up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FLEETGATE = Path(sys.executable).with_name("fleetgate")

SCENARIO = """
name = "ci-smoke"
seed = 2
drain_s = 4

[[groups]]
name = "sensors"
devices = 20
rate = 2.0

[[groups]]
name = "gateways"
devices = 4
rate = 1.0
qos = 2
mqtt = 3

[[stages]]
name = "ramp"
duration_s = 2
connect_rate = 30

[[stages]]
name = "steady"
duration_s = 5
churn = 0.05

[[misbehaviour]]
kind = "acl-probe"
at_s = 1

[[misbehaviour]]
kind = "foreign-ca"
at_s = 1

[[misbehaviour]]
kind = "expired-certificate"
at_s = 1

[[misbehaviour]]
kind = "oversized-packet"
at_s = 2

[[faults]]
kind = "revoke"
at_s = 4
group = "sensors"
percent = 10
"""


def test_a_scenario_runs_on_a_throwaway_directory_over_two_processes(home, tmp_path):
    scenario = tmp_path / "ci.toml"
    scenario.write_text(SCENARIO)
    report = tmp_path / "report"
    result = subprocess.run(
        [str(FLEETGATE), "sim", str(scenario), "--procs", "2", "--json", "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert all(v["held"] for v in data["invariants"].values()), data["invariants"]
    # two sensors are revoked at 4 s; one still waiting to enroll then is refused for good
    revoked_first = data["refusals"].get("EST 409 (revoked)", 0)
    assert data["enrolled"] + revoked_first == 24, data["errors"]
    assert data["peak_connected"] >= 20
    assert data["acknowledged"] > 100
    assert data["lost"] == 0 and data["delivered_ratio"] == 1.0
    assert data["delivered_unique"] >= data["acknowledged"]
    assert (
        data["revoked"] == 2
        and data["kicked"] + data["refusals"].get("CONNACK NOT_AUTHORIZED", 0) >= 2
    )
    refusals = data["refusals"]
    for reason in (
        "TLS unknown ca",
        "TLS certificate expired",
        "PUBACK NOT_AUTHORIZED",
        "SUBACK NOT_AUTHORIZED",
        "DISCONNECT PACKET_TOO_LARGE",
    ):
        assert refusals.get(reason) == 1, (reason, refusals)
    assert [f["fault"] for f in data["faults"]] == ["revoke 10% of sensors"]
    assert data["latency_ms"]["publish_to_deliver"]["p99"] is not None
    assert {p.name for p in report.iterdir()} == {"report.txt", "report.json", "report.html"}
    assert "All 6 invariants held" in (report / "report.html").read_text()
    # Never the user's data directory: nothing was created in it.
    assert not (home / "registry.db").exists()
    assert not (home / "sim").exists()
