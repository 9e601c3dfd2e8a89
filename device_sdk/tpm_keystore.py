"""A device identity whose key lives in a TPM 2.0: :class:`TpmKeyStore`.

The directory looks like a :class:`FileKeyStore`'s, with ``device.tss2.pem`` (0600) instead of
``device.key``: a ``TSS2 PRIVATE KEY`` blob that only this TPM can load. TLS signs with it
through the tpm2-openssl provider inside stdlib ``ssl``.

Loading the provider into a running process: CPython's ``ssl`` uses OpenSSL's default library
context, which reads ``OPENSSL_CONF`` once, when OpenSSL initialises. Rather than requiring that
file before start, :func:`load_tpm2_provider` calls libcrypto's ``OSSL_PROVIDER_load`` (after
setting ``TPM2OPENSSL_TCTI``, which the provider reads when it starts) and
``EVP_set_default_properties("?tpm2.signature")`` through ctypes (:mod:`device_sdk.hazmat`), so it
works after ``ssl`` was imported and contexts were made. The property only *prefers* tpm2 for
signatures: digests, ciphers and the RNG stay in the default provider (``?provider=tpm2`` would
send every hash, ``hashlib`` included, through the TPM). Without the property, OpenSSL 3.0 signs
with the default provider, which cannot use the TPM key ("missing private key").

The provider is process-wide and bound to one TCTI: one process serves one TPM, and a process
that loads it should not also *sign* with software keys through ``ssl`` (a TLS server with a
file key then fails with "EVP lib"); a device process has no such keys. If the TPM or its
resource manager goes away later, handshakes fail until the process restarts.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk import provisioning, tpm_provisioning
from device_sdk.errors import KeyStoreError
from device_sdk.hazmat import MissingBinding, cpython, libcrypto
from device_sdk.keystore import FileKeyStore, _pem, _write_atomic
from device_sdk.tpm import Tpm, TpmKey, TpmPrivateKey

__all__ = ["KeyRenewal", "TpmKeyStore", "load_tpm2_provider"]

KeyRenewal = Literal["reuse", "rotate"]
"""``reuse``: renew with the same TPM key (plain ``simplereenroll``); ``rotate``: a new TPM key,
proven again through attested enrollment (``fleetgate/tpm/*``) with the current certificate."""

TPM2_PROPERTIES = b"?tpm2.signature"

_provider_lock = threading.Lock()
_provider_tcti: str | None = None  # the TCTI the provider was loaded with, once loaded


class TpmKeyStore(FileKeyStore):
    """``device.tss2.pem`` (0600), ``device.crt`` (+ chain) and ``ca.crt`` in a directory, with
    the key in the TPM reached through ``tcti`` (a resource manager: ``tabrmd:...`` or
    ``device:/dev/tpmrm0``, because a TLS handshake outgrows the TPM's 3 object slots)."""

    def __init__(self, directory: Path, *, tcti: str, renewal: KeyRenewal = "reuse") -> None:
        if renewal not in ("reuse", "rotate"):
            raise ValueError(f"TPM key renewal is 'reuse' or 'rotate', not {renewal!r}")
        super().__init__(directory)
        self.tcti = tcti
        self.renewal: KeyRenewal = renewal

    @property
    def key_path(self) -> Path:
        return self.directory / "device.tss2.pem"

    @property
    def ek_chain_path(self) -> Path:
        """PEM certificates between the EK certificate and the manufacturer's root (may be
        absent): a key rotation presents them again with the EK certificate."""
        return self.directory / "ek-chain.pem"

    def set_ek_chain(self, certs: Sequence[x509.Certificate]) -> None:
        _write_atomic(self.ek_chain_path, _pem(certs), mode=0o644)

    def ek_chain(self) -> list[x509.Certificate]:
        if not self.ek_chain_path.exists():
            return []
        return x509.load_pem_x509_certificates(self.ek_chain_path.read_bytes())

    def tpm_key(self) -> TpmKey:
        """The device's current TPM key; :class:`KeyStoreError` if not enrolled."""
        try:
            return TpmKey.from_pem(self.key_path.read_bytes())
        except FileNotFoundError:
            raise self._not_enrolled() from None

    def load_identity(self, context: ssl.SSLContext) -> None:
        """Present the certificate and sign with the TPM key (tpm2-openssl, loaded on demand)."""
        if not (self.certificate_path.exists() and self.key_path.exists()):
            raise self._not_enrolled()
        load_tpm2_provider(self.tcti)
        super().load_identity(context)

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        """``reuse``: the current TPM key (a new one before the first enrollment); ``rotate``:
        a new key in the TPM. Either signs the CSR in the TPM."""
        if self.renewal == "reuse" and self.key_path.exists():
            return TpmPrivateKey(self.tpm_key(), self.tcti)
        with Tpm(self.tcti) as tpm:
            return TpmPrivateKey(tpm.create_device_key(), self.tcti)

    def install(self, key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]) -> None:
        """Switch to a TPM key from :meth:`new_key` and its certificate in one step."""
        if not isinstance(key, TpmPrivateKey):
            raise KeyStoreError(
                f"a TpmKeyStore holds TPM keys only, not {type(key).__name__}: sign the CSR "
                "with TpmKeyStore.new_key() (or use a FileKeyStore for software keys)"
            )
        if not chain:
            raise KeyStoreError("install() needs the device certificate (an empty chain was given)")
        if chain[0].public_key() != key.public_key():
            raise KeyStoreError(
                f"certificate {chain[0].serial_number:x} is not for the TPM key being installed"
            )
        with self._lock:
            _write_atomic(self._staged(self.key_path), key.tpm_key.to_pem(), mode=0o600)
            _write_atomic(self._staged(self.certificate_path), _pem(chain), mode=0o644)
            self._recover()

    def renew(self, device_id: str, *, est_url: str, timeout: float = 30.0) -> x509.Certificate:
        """Renewal by :attr:`renewal`: ``simplereenroll`` with the same key, or a new attested
        key (both authenticated by the device's current certificate)."""
        if self.renewal == "reuse":
            return provisioning.reenroll(self, device_id, est_url=est_url, timeout=timeout)
        return tpm_provisioning.rotate_tpm_key(self, device_id, est_url=est_url, timeout=timeout)


def load_tpm2_provider(tcti: str) -> None:
    """Make stdlib ``ssl`` sign with TPM keys from ``tcti``: tpm2-openssl + ``?tpm2.signature``.

    Idempotent for one TCTI; a second TPM in the same process is refused. The TPM is opened
    once first, so an unreachable TPM or resource manager raises
    :class:`~device_sdk.tpm.TpmUnavailable` saying how to start it.
    """
    global _provider_tcti
    with _provider_lock:
        if _provider_tcti == tcti:
            return
        if _provider_tcti is not None:
            raise KeyStoreError(
                f"this process already signs with the TPM at {_provider_tcti!r}; tpm2-openssl "
                f"serves one TPM per process, so use {tcti!r} from another process"
            )
        Tpm(tcti).close()  # the actionable error, if the TPM cannot be reached
        os.environ["TPM2OPENSSL_TCTI"] = tcti  # read by the provider when it initialises
        load_provider, set_default_properties = _provider_api()
        for name in (b"default", b"tpm2"):  # loading one provider stops the default's fallback
            if not load_provider(None, name):
                raise KeyStoreError(
                    f"OpenSSL ({ssl.OPENSSL_VERSION}) could not load its {name.decode()} "
                    "provider: install tpm2-openssl (the provider module tpm2.so in OpenSSL's "
                    "ossl-modules directory) and check the TPM is reachable through "
                    f"{tcti!r}"
                )
        if set_default_properties(None, TPM2_PROPERTIES) != 1:
            raise KeyStoreError(f"OpenSSL refused the default properties {TPM2_PROPERTIES!r}")
        _provider_tcti = tcti


def _provider_api() -> tuple[Any, Any]:
    """libcrypto's ``OSSL_PROVIDER_load`` and ``EVP_set_default_properties`` (both bound before
    either is used), as linked by CPython's ``_ssl`` (the OpenSSL ``ssl`` uses)."""
    try:
        lib = libcrypto.through(cpython.STDLIB_SSL_EXTENSION)
        return lib.OSSL_PROVIDER_load, lib.EVP_set_default_properties
    except MissingBinding as exc:
        raise KeyStoreError(
            f"Python's ssl module ({ssl.OPENSSL_VERSION}) exposes no OpenSSL 3 provider API "
            f"({exc}): TPM keys need ssl linked against OpenSSL 3 with tpm2-openssl; or start "
            "the process with OPENSSL_CONF naming a config that activates the tpm2 provider "
            "and sets default_properties = ?tpm2.signature"
        ) from exc
