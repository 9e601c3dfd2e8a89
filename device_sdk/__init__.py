"""fleetgate device SDK: a device's identity in a key store, its EST enrollment and renewal, and
its MQTT session over mutual TLS 1.3 (:class:`DeviceClient`).

The names below are imported when first used (PEP 562), so importing one submodule loads only
what it needs: the broker's bridge takes :class:`Backoff` and the key stores without loading
paho, which only :mod:`device_sdk.client` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_sdk.backoff import Backoff
    from device_sdk.ciphers import CipherPolicy, hardware_aes, suites_for
    from device_sdk.client import Ack, ConnectionInfo, DeviceClient, Message, MqttVersion
    from device_sdk.errors import (
        AckTimeout,
        CipherPolicyError,
        ClientClosed,
        DeviceSdkError,
        EnrollmentError,
        KeyStoreError,
        NotConnected,
        PublishRefused,
        QueueFull,
        SubscribeRefused,
    )
    from device_sdk.est import EstClient, EstError, client_context, device_csr
    from device_sdk.keystore import FileKeyStore, KeyStore, device_id_of
    from device_sdk.provisioning import RenewalPolicy, renewal_due
    from device_sdk.tls import device_context

_HOMES = {
    "backoff": ["Backoff"],
    "ciphers": ["CipherPolicy", "hardware_aes", "suites_for"],
    "client": ["Ack", "ConnectionInfo", "DeviceClient", "Message", "MqttVersion"],
    "errors": [
        "AckTimeout",
        "CipherPolicyError",
        "ClientClosed",
        "DeviceSdkError",
        "EnrollmentError",
        "KeyStoreError",
        "NotConnected",
        "PublishRefused",
        "QueueFull",
        "SubscribeRefused",
    ],
    "est": ["EstClient", "EstError", "client_context", "device_csr"],
    "keystore": ["FileKeyStore", "KeyStore", "device_id_of"],
    "provisioning": ["RenewalPolicy", "renewal_due"],
    "tls": ["device_context"],
}
_HOME_OF = {name: f"device_sdk.{module}" for module, names in _HOMES.items() for name in names}

__all__ = [
    "Ack",
    "AckTimeout",
    "Backoff",
    "CipherPolicy",
    "CipherPolicyError",
    "ClientClosed",
    "ConnectionInfo",
    "DeviceClient",
    "DeviceSdkError",
    "EnrollmentError",
    "EstClient",
    "EstError",
    "FileKeyStore",
    "KeyStore",
    "KeyStoreError",
    "Message",
    "MqttVersion",
    "NotConnected",
    "PublishRefused",
    "QueueFull",
    "RenewalPolicy",
    "SubscribeRefused",
    "client_context",
    "device_context",
    "device_csr",
    "device_id_of",
    "hardware_aes",
    "renewal_due",
    "suites_for",
]


def __getattr__(name: str) -> object:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'device_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
