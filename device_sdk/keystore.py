"""Where a device keeps its identity: the key store interface, and a store in a directory.

The TLS layer needs five things from a key store, whatever holds the key: the trust anchors that
verify servers, the certificate chain, a way to put the private key into an ``ssl.SSLContext``,
and, for (re)enrollment, a fresh key that can sign a CSR plus an atomic switch to that key and its
certificate. A TPM or smartcard store fits the same shape: its ``new_key`` returns an
``ec.EllipticCurvePrivateKey`` subclass whose ``sign()`` runs on the chip (tpm2-pytss's
``tpm_ecc_private_key``; cryptography's CSR builder calls it), and its ``load_identity`` hands
OpenSSL a ``TSS2 PRIVATE KEY`` file or a provider URI instead of a PEM key.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk.errors import KeyStoreError

DEVICE_URI_PREFIX = "urn:fleetgate:device:"


class KeyStore(Protocol):
    """What the TLS layer and enrollment need from wherever the device key lives."""

    @property
    def trust_anchors_path(self) -> Path:
        """PEM file of the fleet CA certificates that verify the broker and the EST server."""
        ...

    @property
    def certificate_path(self) -> Path:
        """PEM file of the device certificate, followed by its intermediate CA certificates."""
        ...

    def certificates(self) -> list[x509.Certificate]:
        """The device certificate chain, leaf first; :class:`KeyStoreError` if not enrolled."""
        ...

    def load_identity(self, context: ssl.SSLContext) -> None:
        """Make ``context`` present the device certificate and sign with the device key."""
        ...

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        """A fresh P-256 key, not yet in use: sign the CSR with it, then :meth:`install` it."""
        ...

    def install(self, key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]) -> None:
        """Switch to ``key`` and its certificate ``chain`` in one step (no half-renewed state)."""
        ...


@runtime_checkable
class RenewingKeyStore(KeyStore, Protocol):
    """A key store that renews in its own way (a TPM store that rotates its key re-attests it
    instead of a plain ``simplereenroll``); :class:`DeviceClient` calls :meth:`renew`."""

    def renew(self, device_id: str, *, est_url: str, timeout: float = 30.0) -> x509.Certificate:
        """Obtain and install the next certificate, authenticated by the current one."""
        ...


def device_id_of(cert: x509.Certificate) -> str:
    """The device id a fleetgate device certificate names in its ``urn:fleetgate:device:`` SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    ids = [uri.removeprefix(DEVICE_URI_PREFIX) for uri in uris if uri.startswith(DEVICE_URI_PREFIX)]
    if len(ids) != 1:
        raise KeyStoreError(
            f"certificate {cert.serial_number:x} ({cert.subject.rfc4514_string()}) is not a "
            f"fleetgate device certificate: it needs exactly one {DEVICE_URI_PREFIX}<id> URI SAN"
        )
    return ids[0]


class FileKeyStore:
    """A directory holding ``device.key`` (0600), ``device.crt`` (+ chain) and ``ca.crt``.

    :meth:`install` writes ``device.key.new`` and then ``device.crt.new``; the second file is the
    commit record. Both are renamed into place afterwards, and a store opened after a crash
    between the renames finishes them, so the key and certificate on disk always belong together.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            self._recover()

    @property
    def trust_anchors_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def certificate_path(self) -> Path:
        return self.directory / "device.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "device.key"

    def set_trust_anchors(self, certs: Sequence[x509.Certificate]) -> None:
        """Provision the fleet CA certificates (from the factory, or EST ``cacerts``)."""
        _write_atomic(self.trust_anchors_path, _pem(certs), mode=0o644)

    def certificates(self) -> list[x509.Certificate]:
        with self._lock:
            try:
                data = self.certificate_path.read_bytes()
            except FileNotFoundError:
                raise self._not_enrolled() from None
        return x509.load_pem_x509_certificates(data)

    def load_identity(self, context: ssl.SSLContext) -> None:
        with self._lock:
            if not (self.certificate_path.exists() and self.key_path.exists()):
                raise self._not_enrolled()
            try:
                context.load_cert_chain(self.certificate_path, self.key_path)
            except ssl.SSLError as exc:
                raise KeyStoreError(
                    f"{self.key_path} and {self.certificate_path} do not load as a pair "
                    f"({exc.reason or exc}): re-enroll the device"
                ) from exc

    def new_key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def install(self, key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]) -> None:
        if not chain:
            raise KeyStoreError("install() needs the device certificate (an empty chain was given)")
        if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
            raise KeyStoreError(
                f"certificate {chain[0].serial_number:x} is not for the key being installed: "
                "the CSR and the certificate must come from the same new_key()"
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self._lock:
            _write_atomic(self._staged(self.key_path), key_pem, mode=0o600)
            _write_atomic(self._staged(self.certificate_path), _pem(chain), mode=0o644)
            self._recover()

    def _recover(self) -> None:
        """Finish an install whose commit record exists; forget a key that never got one."""
        staged_cert = self._staged(self.certificate_path)
        staged_key = self._staged(self.key_path)
        if staged_cert.exists():
            if staged_key.exists():
                os.replace(staged_key, self.key_path)
            os.replace(staged_cert, self.certificate_path)
            _fsync_directory(self.directory)
        elif staged_key.exists():
            staged_key.unlink()

    def _not_enrolled(self) -> KeyStoreError:
        return KeyStoreError(
            f"no device key and certificate in {self.directory}: enroll the device first "
            "(DeviceClient.enroll with station credentials)"
        )

    @staticmethod
    def _staged(path: Path) -> Path:
        return path.with_name(path.name + ".new")


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyStoreError(f"fleetgate device keys are ECDSA P-256, not {type(key).__name__}")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` in one step with a file created at ``mode`` (never briefly wider)."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
        os.fchmod(file.fileno(), mode)  # an existing .tmp keeps its old mode through O_CREAT
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
