"""The device agent behind ``fleetgate device run``: one device, from its data directory.

The directory is a :class:`FileKeyStore` (``device.key``, ``device.crt``, ``ca.crt``) plus an
optional ``device.toml``::

    broker = "localhost:8883"
    est_url = "https://localhost:8443"   # enables automatic renewal
    interval_s = 5.0
    cipher_policy = "auto"               # auto | chacha20 | aes
    mqtt_version = "5"                   # or "3.1.1"

It publishes telemetry to ``devices/<id>/telemetry`` every ``interval_s`` (QoS 1, queued while
offline) and logs what arrives on ``devices/<id>/commands/#``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sdk.ciphers import CipherPolicy
from device_sdk.client import DeviceClient, Message, MqttVersion
from device_sdk.errors import DeviceSdkError, KeyStoreError
from device_sdk.keystore import FileKeyStore, device_id_of

log = logging.getLogger("fleetgate.agent")


class AgentConfigError(DeviceSdkError):
    """``device.toml`` or the key store cannot drive an agent."""


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    host: str = "localhost"
    port: int = 8883
    est_url: str | None = None
    interval_s: float = 5.0
    cipher_policy: CipherPolicy = "auto"
    mqtt_version: MqttVersion = "5"


def load_agent_config(store: FileKeyStore) -> AgentConfig:
    """``device.toml`` from the key store's directory; the device id comes from the certificate."""
    try:
        certs = store.certificates()
    except KeyStoreError as exc:
        raise AgentConfigError(f"{exc}; enroll the device first") from exc
    raw: dict[str, Any] = {}
    path = store.directory / "device.toml"
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise AgentConfigError(f"{path} is not valid TOML: {exc}") from exc
    host, _, port = str(raw.pop("broker", "localhost:8883")).rpartition(":")
    known = {"est_url", "interval_s", "cipher_policy", "mqtt_version"}
    if set(raw) - known:
        raise AgentConfigError(f"{path}: unknown key(s) {sorted(set(raw) - known)}")
    try:
        return AgentConfig(
            device_id=device_id_of(certs[0]), host=host or "localhost", port=int(port), **raw
        )
    except (TypeError, ValueError) as exc:
        raise AgentConfigError(f"{path}: {exc}") from exc


def run_agent(
    directory: Path,
    *,
    stop: threading.Event,
    count: int | None = None,
    interval_s: float | None = None,
) -> int:
    """Publish telemetry until ``stop`` is set or ``count`` messages went out; returns the count."""
    store = FileKeyStore(directory)
    config = load_agent_config(store)
    period = config.interval_s if interval_s is None else interval_s
    client = DeviceClient(
        store,
        config.device_id,
        host=config.host,
        port=config.port,
        est_url=config.est_url,
        cipher_policy=config.cipher_policy,
        mqtt_version=config.mqtt_version,
    )
    started = time.monotonic()
    sent = 0

    def on_command(message: Message) -> None:
        log.info("command received", extra={"topic": message.topic, "bytes": len(message.payload)})

    with client:
        client.subscribe(f"devices/{config.device_id}/commands/#", on_command)
        while not stop.is_set() and (count is None or sent < count):
            payload = {"seq": sent, "uptime_s": round(time.monotonic() - started, 3)}
            client.publish(f"devices/{config.device_id}/telemetry", json.dumps(payload), qos=1)
            sent += 1
            stop.wait(period)
        client.flush(timeout=10.0)
    return sent


__all__ = ["AgentConfig", "AgentConfigError", "load_agent_config", "run_agent"]
