"""Who a connection is and whether it may connect: the certificate, then the registry.

:class:`CertificateIdentities` reads the identity a verified certificate names right after the TLS
handshake (remembering, per certificate, what does not change); :func:`check_admission` asks the
registry, once per CONNECT.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509

from broker.acl import DEFAULT_TEMPLATE, AclTemplate, DeviceAcl
from broker.mqtt import ReasonCode
from enrollment.identity import PeerIdentity, named_identity
from enrollment.registry import AclPatterns, DeviceState, Registry
from fleetgate.errors import NotAuthorised, NotFound


@dataclass(frozen=True, slots=True)
class Identity:
    """The device a connection speaks for.

    ``serial`` is ``None`` only for the plaintext listener's configured test identity, which
    presents no certificate; there, ``client_id_bound`` is False so that a test suite may use
    many client ids under that one identity.
    """

    device_id: str
    serial: int | None
    client_id_bound: bool = True


@dataclass(frozen=True, slots=True)
class Unidentified:
    """A verified certificate that still names no device this broker admits."""

    reason: str


@dataclass(frozen=True, slots=True)
class Admitted:
    group: str
    acl: DeviceAcl


@dataclass(frozen=True, slots=True)
class Refused:
    """``code`` is the MQTT 5 CONNACK reason; the codec maps it to a 3.1.1 return code."""

    reason: str
    code: ReasonCode = ReasonCode.NOT_AUTHORIZED


class CertificateIdentities:
    """The device each TLS-verified client certificate names (clientAuth EKU, URI SAN), kept by
    the certificate's SHA-256 digest.

    A device reconnects with the same certificate many times in its life (network loss, sleep,
    a keep-alive timeout), and reading its extensions is ~30 µs of the broker's own CPU per
    connect. The memory is the process's: a restarted broker reads each certificate afresh.
    Only facts of the certificate itself are kept: its validity window is compared with the
    clock on every connect, and the registry is asked every time (:func:`check_admission`).
    At most ``capacity`` certificates are remembered; the oldest is forgotten first.
    """

    def __init__(self, capacity: int = 16_384) -> None:
        self.capacity = capacity
        self._named: dict[bytes, PeerIdentity | str] = {}

    def identify(self, der: bytes | None, *, now: dt.datetime) -> Identity | Unidentified:
        if der is None:
            return Unidentified("no client certificate (mutual TLS is required)")
        digest = hashlib.sha256(der).digest()
        peer = self._named.get(digest)
        if peer is None:
            peer = self._read(der)
            if len(self._named) >= self.capacity:
                del self._named[next(iter(self._named))]
            self._named[digest] = peer
        if isinstance(peer, str):
            return Unidentified(peer)
        try:
            peer.check_validity(now)
        except NotAuthorised as exc:
            return Unidentified(exc.message)
        if peer.kind != "device":
            return Unidentified(
                f"a {peer.kind} certificate ({peer.id}) cannot connect to the broker: devices only"
            )
        return Identity(peer.id, peer.serial)

    def __len__(self) -> int:
        return len(self._named)

    @staticmethod
    def _read(der: bytes) -> PeerIdentity | str:
        """The identity, or why there is none."""
        try:
            return named_identity(x509.load_der_x509_certificate(der))
        except NotAuthorised as exc:
            return exc.message


def check_admission(registry: Registry, identity: Identity) -> Admitted | Refused:
    """The registry's verdict and, if admitted, the device's ACL. Blocking: run it in a thread.

    A certificate identity must be the device's current active certificate. The plaintext test
    identity needs no registry entry (it then gets the ``default`` group), but one that exists
    must be active, so that suspending it works as for any device.
    """
    if identity.serial is None:
        try:
            device = registry.device(identity.device_id)
        except NotFound:
            group = "default"
        else:
            if device.state != DeviceState.ACTIVE:
                return Refused(f"test identity {identity.device_id} is {device.state}")
            group = device.group
    else:
        return _admit_certificate(registry, identity.device_id, identity.serial)
    return _admitted(registry, identity.device_id, group)


def _admitted(registry: Registry, device_id: str, group: str) -> Admitted:
    return Admitted(group, _template(registry.acl_patterns(group)).for_device(device_id))


def _template(patterns: AclPatterns | None) -> AclTemplate:
    return AclTemplate(patterns.publish, patterns.subscribe) if patterns else DEFAULT_TEMPLATE


def _admit_certificate(registry: Registry, device_id: str, serial: int) -> Admitted | Refused:
    """Only the device's active certificate gets in; the ACL comes from the same read."""
    admission = registry.admission(device_id, serial)
    if not admission.allowed:
        return Refused(admission.reason)
    return Admitted(admission.group or "default", _template(admission.acl).for_device(device_id))
