"""What every simulated fleet shares: the backend identity's group and ACL, the endpoints of
the services under test, and retiring a run's station.

The scenario runner (:mod:`firmware_sim.engine`) runs software-key fleets; the hardware line
(:mod:`firmware_sim.hardware_line`) runs small TPM or smartcard lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.service import EnrollmentService

BACKEND_GROUP = "sim-backend"
BACKEND_ACL = {"publish": ["devices/+/commands/#"], "subscribe": ["devices/+/telemetry"]}


def retire_station(service: EnrollmentService, station_id: str) -> None:
    """Revoke a simulation's station once its devices are enrolled: its key sits on disk under
    ``<home>/sim/``, so it must not outlive the run as an active enrollment credential."""
    service.revoke_station(station_id, reason="cessationOfOperation", actor="sim")


@dataclass(frozen=True)
class Endpoints:
    """Where the services under test listen."""

    est_url: str
    broker_host: str
    broker_port: int
    server_hostname: str = "localhost"


__all__ = ["BACKEND_ACL", "BACKEND_GROUP", "Endpoints", "retire_station"]
