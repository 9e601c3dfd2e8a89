"""The device agent behind ``fleetgate device run``: one device, from its data directory.

The directory is a :class:`FileKeyStore` (``device.key``, ``device.crt``, ``ca.crt``), or a
:class:`~device_sdk.tpm_keystore.TpmKeyStore` when it holds ``device.tss2.pem`` (a key in the
device's TPM) instead of ``device.key``, or a
:class:`~device_sdk.smartcard_keystore.SmartcardKeyStore` (no key file: the key is slot 9A of a
PIV card) when ``device.toml`` has a ``[smartcard]`` table. ``device.toml`` is optional
otherwise::

    broker = "localhost:8883"
    est_url = "https://localhost:8443"   # enables automatic renewal
    interval_s = 5.0
    cipher_policy = "auto"               # auto | chacha20 | aes
    mqtt_version = "5"                   # or "3.1.1"
    tcti = "device:/dev/tpmrm0"          # TPM key stores: the resource manager to reach
    tpm_key_renewal = "reuse"            # TPM key stores: reuse | rotate the key on renewal

    [smartcard]                          # card key stores only
    reader = "Virtual PCD"               # optional: part of the PC/SC reader's name
    pin_file = "card.pin"                # the PIN, in a file of mode 0600 (relative paths are
    # pin_env = "DEVICE_CARD_PIN"        # in the directory), or in an environment variable

The PIN never goes into ``device.toml`` or onto the command line, where other users could read
it (``ps``, a world-readable config).

It publishes telemetry to ``devices/<id>/telemetry`` every ``interval_s`` (QoS 1, queued while
offline) and logs what arrives on ``devices/<id>/commands/#``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_sdk.ciphers import CipherPolicy
from device_sdk.client import DeviceClient, Message, MqttVersion
from device_sdk.errors import DeviceSdkError, KeyStoreError
from device_sdk.keystore import FileKeyStore, KeyStore, device_id_of

if TYPE_CHECKING:
    from device_sdk.tpm_keystore import KeyRenewal

log = logging.getLogger("fleetgate.agent")

DEFAULT_TCTI = "device:/dev/tpmrm0"  # the kernel's TPM resource manager
TPM_KEY_FILES = ("device.tss2.pem", "device.tss2.pem.new")  # a TPM key, or one being installed
KEY_FILES = ("device.key", "device.key.new", *TPM_KEY_FILES)
CARD_SETTINGS = {"reader", "pin_file", "pin_env"}


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


def open_agent(directory: Path) -> tuple[KeyStore, AgentConfig]:
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
        "smartcard",
    }
    if set(raw) - known:
        raise AgentConfigError(f"{path}: unknown key(s) {sorted(set(raw) - known)}")
    card = raw.pop("smartcard", None)
    store = _key_store(directory, raw, path) if card is None else _card_store(directory, card, path)
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


def _card_store(directory: Path, table: object, path: Path) -> KeyStore:
    """The smartcard store that ``[smartcard]`` in ``path`` describes."""
    if not isinstance(table, dict):
        raise AgentConfigError(f"{path}: smartcard must be a table ([smartcard]), not a value")
    if "pin" in table:
        raise AgentConfigError(
            f"{path}: a PIN does not belong in device.toml; put it in a 0600 file named by "
            "pin_file, or in an environment variable named by pin_env"
        )
    if set(table) - CARD_SETTINGS:
        raise AgentConfigError(
            f"{path}: unknown [smartcard] key(s) {sorted(set(table) - CARD_SETTINGS)} "
            f"(known: {sorted(CARD_SETTINGS)})"
        )
    key_files = [name for name in KEY_FILES if (directory / name).exists()]
    if key_files:
        raise AgentConfigError(
            f"{directory} holds {', '.join(key_files)} and {path} a [smartcard] table: a device "
            "has one key; remove the table, or the key files of a previous enrollment"
        )
    reader = table.get("reader")
    from device_sdk.smartcard_keystore import SmartcardKeyStore  # pyscard, M2Crypto: cards only

    return SmartcardKeyStore(
        directory,
        pin=_card_pin(directory, table, path),
        reader=None if reader is None else str(reader),
    )


def _card_pin(directory: Path, table: dict[str, Any], path: Path) -> str:
    """The PIN from ``pin_file`` (mode 0600, a regular file) or ``pin_env``."""
    sources = CARD_SETTINGS.intersection(table) - {"reader"}
    if len(sources) != 1:
        raise AgentConfigError(
            f"{path}: [smartcard] needs exactly one PIN source: pin_file (a file of mode 0600) "
            "or pin_env (an environment variable)"
        )
    if "pin_env" in table:
        name = str(table["pin_env"])
        pin = os.environ.get(name, "")
        if not pin:
            raise AgentConfigError(
                f"{path}: pin_env names {name}, which is not set: export the card's PIN in {name}"
            )
        return pin
    pin_path = directory / str(table["pin_file"])
    try:
        mode = pin_path.stat().st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise AgentConfigError(
                f"the PIN file {pin_path} must be a regular file only its owner can read (it is "
                f"{stat.filemode(mode)}): chmod 600 {pin_path}"
            )
        pin = pin_path.read_text().strip()
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read the PIN file {pin_path}: {exc}") from exc
    if not pin:
        raise AgentConfigError(f"the PIN file {pin_path} is empty: write the card's PIN there")
    return pin


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
