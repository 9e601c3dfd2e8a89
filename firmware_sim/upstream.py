"""The upstream of a scenario's bridge (``[bridge]``): Debian's Mosquitto on loopback, the
broker's ``[[bridge]]`` to it, and the outage fault.

The bridge forwards every device's telemetry (``devices/+/telemetry``, same topic upstream)
with store-and-forward (broker/bridge/). Its client identity is a fleet certificate
(``<station>-bridge``, group ``bridges``) in a device-SDK key store under the data directory;
Mosquitto requires a client certificate and verifies it against the fleet chain. Mosquitto
keeps persistent sessions (saved when it stops), so the simulator's subscriber there, which
counts as a checked subscriber (every acknowledged message must reach it), keeps its
subscription across an outage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.deployment import HOST, toml_text
from firmware_sim.mosquitto import Mosquitto
from fleetgate.config import Config
from fleetgate.keyfiles import write_certificates, write_private_key

BRIDGED = "devices/+/telemetry"
UPSTREAM_SUBSCRIBER = "sim-upstream"


class Upstream:
    """Mosquitto as the bridge's upstream, and the ``[[bridge]]`` table that points at it."""

    def __init__(self, config: Config, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        self.keystore = config.home / "sim-bridge"
        ca_dir = config.ca_dir
        self.mosquitto = Mosquitto(
            config.home / "sim-upstream",
            cafile=ca_dir / "chain.pem",
            certfile=ca_dir / "server.crt",
            keyfile=ca_dir / "server.key",
            # no per-client queue limit (Mosquitto's default of 1,000 would be its loss, not the
            # bridge's); sessions saved when it stops, not after every change
            extra=("max_queued_messages 0", "autosave_on_changes false", "autosave_interval 3600"),
        )

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.mosquitto.port

    def bridge_table(self) -> str:
        """The ``[[bridge]]`` for fleetgate.toml."""
        values = {
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            "keepalive_s": 5,
            **self.settings,
            "name": "sim-upstream",
            "host": "localhost",
            "port": self.mosquitto.port,
            "keystore": str(self.keystore),
        }
        rule = f"local = {json.dumps(BRIDGED)}\nremote = {json.dumps(BRIDGED)}\n"
        return f"\n[[bridge]]\n{toml_text(values)}[[bridge.out]]\n{rule}"

    def write_identity(
        self,
        key: ec.EllipticCurvePrivateKey,
        chain: list[Any],
        root: Path,
    ) -> None:
        """The bridge's key store: device.key (0600), device.crt (+ issuing CA), ca.crt."""
        self.keystore.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_key(self.keystore / "device.key", key)
        write_certificates(self.keystore / "device.crt", chain)
        (self.keystore / "ca.crt").write_bytes(root.read_bytes())

    def start(self) -> None:
        self.mosquitto.start()

    def stop(self) -> None:
        self.mosquitto.stop()

    async def outage(self, duration_s: float) -> None:
        """Mosquitto stopped (SIGTERM: it saves its sessions) for ``duration_s``, then started
        again on the same port: the bridge's connection drops and reconnects are refused."""
        await asyncio.to_thread(self.mosquitto.stop)
        await asyncio.sleep(duration_s)
        await asyncio.to_thread(self.mosquitto.start)


__all__ = ["BRIDGED", "UPSTREAM_SUBSCRIBER", "Upstream"]
