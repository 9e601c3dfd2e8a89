"""The device agent behind ``fleetgate device run``: one device, from its data directory.

The directory is a :class:`FileKeyStore` (``device.key``, ``device.crt``, ``ca.crt``), or a
:class:`~device_sdk.tpm_keystore.TpmKeyStore` when it holds ``device.tss2.pem`` (a key in the
device's TPM) instead of ``device.key``, plus an optional ``device.toml``::

    broker = "localhost:8883"
    est_url = "https://localhost:8443"   # enables automatic renewal
    interval_s = 5.0
    cipher_policy = "auto"               # auto | chacha20 | aes
    mqtt_version = "5"                   # or "3.1.1"
    tcti = "device:/dev/tpmrm0"          # TPM key stores: the resource manager to reach
    tpm_key_renewal = "reuse"            # TPM key stores: reuse | rotate the key on renewal

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
from typing import TYPE_CHECKING, Any

from device_sdk.ciphers import CipherPolicy
from device_sdk.client import DeviceClient, Message, MqttVersion
from device_sdk.errors import DeviceSdkError, KeyStoreError
from device_sdk.keystore import FileKeyStore, device_id_of

if TYPE_CHECKING:
    from device_sdk.tpm_keystore import KeyRenewal

log = logging.getLogger("fleetgate.agent")

DEFAULT_TCTI = "device:/dev/tpmrm0"  # the kernel's TPM resource manager
TPM_KEY_FILES = ("device.tss2.pem", "device.tss2.pem.new")  # a TPM key, or one being installed


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
    tcti: str = DEFAULT_TCTI
    tpm_key_renewal: KeyRenewal = "reuse"


def open_agent(directory: Path) -> tuple[FileKeyStore, AgentConfig]:
    """The key store in ``directory`` and ``device.toml``; the device id is the certificate's.

    The store's kind is chosen from the files before it is opened: opening a TPM store's
    directory as a file store would "recover" its half-installed certificate without its key.
    """
    path = directory / "device.toml"
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise AgentConfigError(f"{path} is not valid TOML: {exc}") from exc
    host, _, port = str(raw.pop("broker", "localhost:8883")).rpartition(":")
    known = {
        "est_url",
        "interval_s",
        "cipher_policy",
        "mqtt_version",
        "tcti",
        "tpm_key_renewal",
    }
    if set(raw) - known:
        raise AgentConfigError(f"{path}: unknown key(s) {sorted(set(raw) - known)}")
    store = _key_store(directory, raw, path)
    try:
        certs = store.certificates()
    except KeyStoreError as exc:
        raise AgentConfigError(f"{exc}; enroll the device first") from exc
    try:
        config = AgentConfig(
            device_id=device_id_of(certs[0]), host=host or "localhost", port=int(port), **raw
        )
    except (TypeError, ValueError) as exc:
        raise AgentConfigError(f"{path}: {exc}") from exc
    return store, config


def _key_store(directory: Path, raw: dict[str, Any], path: Path) -> FileKeyStore:
    if not any((directory / name).exists() for name in TPM_KEY_FILES):
        return FileKeyStore(directory)
    from device_sdk.tpm_keystore import TpmKeyStore  # tpm2-pytss only where there is a TPM key

    try:
        return TpmKeyStore(
            directory,
            tcti=str(raw.get("tcti", DEFAULT_TCTI)),
            renewal=raw.get("tpm_key_renewal", "reuse"),
        )
    except ValueError as exc:
        raise AgentConfigError(f"{path}: {exc}") from exc


def run_agent(
    directory: Path,
    *,
    stop: threading.Event,
    count: int | None = None,
    interval_s: float | None = None,
) -> int:
    """Publish telemetry until ``stop`` is set or ``count`` messages went out; returns the count."""
    store, config = open_agent(directory)
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


__all__ = ["AgentConfig", "AgentConfigError", "open_agent", "run_agent"]
