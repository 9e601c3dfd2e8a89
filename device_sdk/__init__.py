"""fleetgate device SDK: a device's identity in a key store, its EST enrollment and renewal, and
its MQTT session over mutual TLS 1.3 (:class:`DeviceClient`)."""

from device_sdk.ciphers import CipherPolicy, hardware_aes, suites_for
from device_sdk.client import (
    Ack,
    Backoff,
    ConnectionInfo,
    DeviceClient,
    Message,
    MqttVersion,
)
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
