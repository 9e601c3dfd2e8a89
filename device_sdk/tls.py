"""The device's TLS client contexts: TLS 1.3, fleet CA, hostname check, key store, cipher policy."""

from __future__ import annotations

import ssl

from device_sdk.ciphers import CipherPolicy, resolve, set_tls13_suites
from device_sdk.errors import KeyStoreError
from device_sdk.est import client_context
from device_sdk.keystore import KeyStore


def trusting_context(keystore: KeyStore) -> ssl.SSLContext:
    """TLS 1.3 that verifies servers against the key store's fleet CA (no client identity yet)."""
    trust = keystore.trust_anchors_path
    if not trust.exists():
        raise KeyStoreError(
            f"no trust anchors at {trust}: provision the fleet root CA certificate there "
            "(FileKeyStore.set_trust_anchors) before enrolling or connecting"
        )
    return client_context(trust)


def device_context(keystore: KeyStore, cipher_policy: CipherPolicy = "auto") -> ssl.SSLContext:
    """A mutual-TLS 1.3 client context that presents the device identity held in ``keystore``.

    The server must chain to the key store's trust anchors and match the host name connected to.
    Built afresh after each renewal, so a live connection keeps the context it started with.
    """
    context = trusting_context(keystore)
    keystore.load_identity(context)
    set_tls13_suites(context, resolve(cipher_policy))
    return context
