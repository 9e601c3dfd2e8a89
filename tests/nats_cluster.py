"""A real nats-server cluster on loopback for the fabric tests, the demo and the benchmark.

The cluster itself lives in :mod:`firmware_sim.nats_cluster` (the simulator's fabric
deployment runs one too); this module re-exports it and adds what only the tests use: the
accounts and TLS blocks of the fleet's NATS configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from firmware_sim.nats_cluster import (
    NatsCluster,
    NatsNode,
    healthy_cluster,
    nats_server_binary,
    server_version,
)

__all__ = [
    "FabricUsers",
    "NatsCluster",
    "NatsNode",
    "accounts_block",
    "healthy_cluster",
    "nats_server_binary",
    "server_version",
    "tls_block",
]


# -- accounts, permissions and TLS (issue 12, "no way around the gate") ----------------------------


@dataclass(frozen=True)
class FabricUsers:
    """The NATS users of the fleet's account, with the passwords a test made up."""

    fleetgate: str
    telemetry: str
    commands: str


def accounts_block(users: FabricUsers) -> str:
    """The account and users docs/operations.md describes: fleetgate's nodes may use every
    subject of the FLEET account (device topics are arbitrary MQTT topics, each checked against
    the device's ACL before it reaches NATS); a telemetry reader may only subscribe to device
    telemetry; a command writer may only publish device commands. No user, no entry."""
    return f"""
accounts {{
  FLEET {{
    jetstream: enabled
    users: [
      {{ user: fleetgate, password: "{users.fleetgate}" }}
      {{ user: telemetry, password: "{users.telemetry}",
         permissions: {{
           publish: {{ deny: [">"] }}
           subscribe: {{ allow: ["devices.*.telemetry", "devices.*.telemetry.>"] }}
         }} }}
      {{ user: commands, password: "{users.commands}",
         permissions: {{
           publish: {{ allow: ["devices.*.commands", "devices.*.commands.>"] }}
           subscribe: {{ deny: [">"] }}
         }} }}
    ]
  }}
}}
"""


def tls_block(cert: Path, key: Path, ca: Path) -> str:
    """Client connections over TLS 1.3 only, each with a certificate from ``ca``."""
    return f"""
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  verify: true
  min_version: "1.3"
  timeout: 2
}}
"""
