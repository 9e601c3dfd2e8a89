"""`fleetgate sim`: a simulated fleet against the real services, and a report that adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from enrollment.registry import Registry, StationState

FLEETGATE = Path(sys.executable).with_name("fleetgate")


def test_simulated_fleet_reports_every_message_delivered_and_every_misbehaviour_refused(config):
    env = dict(os.environ)
    result = subprocess.run(
        [
            str(FLEETGATE),
            "sim",
            "--devices",
            "30",
            "--messages",
            "4",
            "--misbehaving",
            "3",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    normal = 30 - 3
    assert report["enrolled"] == 29  # the foreign-CA device never reaches the station
    assert report["connected"] == normal + 1  # plus the one that publishes off-limits
    assert report["sent"] == report["acknowledged"] == report["delivered"] == (normal + 1) * 4
    assert report["commands_delivered"] == normal + 1
    assert report["refused"] == {
        "TLS handshake: sslv3_alert_certificate_expired": 1,
        "TLS handshake: tlsv1_alert_unknown_ca": 1,
        "publish to another device's topic: NOT_AUTHORIZED": 1,
    }
    assert report["connect_ms"]["p99"] is not None
    assert report["delivery_ms"]["p50"] <= report["delivery_ms"]["p99"]
    # The run's station served only this run: it is revoked, so its key left on disk is useless.
    registry = Registry(config.database_url)
    try:
        stations = [s for s in registry.stations() if s.id.startswith("sim-")]
    finally:
        registry.close()
    assert [s.state for s in stations] == [StationState.REVOKED]
