"""Who a connection is and whether it may connect: the certificate, then the registry.

:class:`CertificateIdentities` reads the identity a verified certificate names right after the TLS
handshake (remembering, per certificate, what does not change). At CONNECT,
:func:`read_admission_facts` asks the registry (I/O) and :func:`decide_admission` alone decides:
the one place a CONNECT's verdict is made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, replace

from cryptography import x509

from broker.acl import DeviceAcl, bind_acl
from broker.limits import audit_text
from broker.mqtt import ReasonCode
from enrollment.identity import PeerIdentity, named_identity
from enrollment.registry import AdmissionFacts, CertStatus, DeviceState, Registry, SubjectKind
from fleetgate.errors import NotAuthorised


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
    """``code`` is the MQTT 5 CONNACK reason; the codec maps it to a 3.1.1 return code.
    ``label`` names the refusal in ``connect_refusals_total`` and the audit trail."""

    reason: str
    code: ReasonCode = ReasonCode.NOT_AUTHORIZED
    label: str = "admission"


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


def read_admission_facts(registry: Registry, identity: Identity) -> AdmissionFacts:
    """The registry's facts for this CONNECT; blocking (the caller picks the thread).

    The plaintext listener's test identity needs no registry entry: it then gets the default
    group, whose ACL is read here.
    """
    facts = registry.admission_facts(identity.device_id, identity.serial)
    if facts.device_state is None and identity.serial is None:
        return replace(facts, acl=registry.acl_patterns(facts.group))
    return facts


def decide_admission(
    facts: AdmissionFacts | None, identity: Identity, *, barred: bool, will_topic: str | None
) -> Admitted | Refused:
    """Whether ``identity`` may connect, given the registry's ``facts`` (None: the registry
    could not be read), whether the change feed barred the device since the read began, and
    the CONNECT's will topic. Pure.

    A certificate must be the device's current active certificate; the plaintext test
    identity needs no registry entry, but one that exists must be active, so that suspending it
    works as for any device.
    """
    device_id = identity.device_id
    if facts is None:
        return Refused("the registry is unavailable", ReasonCode.SERVER_UNAVAILABLE)
    state = facts.device_state
    if identity.serial is None:
        if state is not None and state != DeviceState.ACTIVE:
            return Refused(f"test identity {device_id} is {state}")
    else:
        if state is None:
            return Refused(f"device {device_id} is not in the registry")
        if state != DeviceState.ACTIVE:
            return Refused(f"device {device_id} is {state}")
        cert = facts.certificate
        if cert is None or cert.kind != SubjectKind.DEVICE or cert.subject != device_id:
            return Refused(f"certificate {identity.serial:x} was not issued to {device_id}")
        if cert.status != CertStatus.ACTIVE:
            renewed = cert.status == CertStatus.SUPERSEDED
            advice = ": connect with the renewed certificate" if renewed else ""
            return Refused(f"certificate {cert.serial} of {device_id} is {cert.status}{advice}")
    if barred:
        return Refused(f"device {device_id} was barred while connecting")
    acl = bind_acl(facts.acl, device_id)
    if will_topic is not None and not acl.may_publish(will_topic):
        return Refused(f"will topic {audit_text(will_topic)!r} is not permitted", label="will")
    return Admitted(facts.group, acl)
