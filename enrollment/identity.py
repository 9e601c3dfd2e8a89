"""Who a verified peer certificate names, and whether it may act as that identity.

The TLS layer has already checked the chain to the fleet CA; these pure checks add what TLS does
not: the certificate's purpose (an end-entity signing key for clientAuth), its validity window
(again, in case TLS verification was relaxed) and the one identity encoded in its URI SAN. The
fleet CA never issues anything else, so any other shape is refused here, before the registry is
asked: the registry's serial check should not be the only thing between a malformed certificate
and a session.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetgate.errors import InvalidDeviceId, NotAuthorised
from fleetgate.ids import URI_PREFIXES, SubjectKind, id_from_uri

_E = TypeVar("_E", bound=x509.ExtensionType)


@dataclass(frozen=True)
class PeerIdentity:
    """The identity a client certificate proves."""

    kind: SubjectKind
    id: str
    serial: int
    not_after: dt.datetime
    not_before: dt.datetime

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.id}"

    def check_validity(self, now: dt.datetime) -> None:
        """Raises :class:`NotAuthorised` outside the certificate's validity window."""
        if not self.not_before <= now <= self.not_after:
            raise NotAuthorised(
                f"the client certificate is outside its validity ({self.not_before:%Y-%m-%d} "
                f"to {self.not_after:%Y-%m-%d}): renew it before it expires, or re-provision"
            )


def identify_client(cert: x509.Certificate, *, now: dt.datetime) -> PeerIdentity:
    """The device or station a client certificate names; refuses anything else."""
    peer = named_identity(cert)
    peer.check_validity(now)
    return peer


def named_identity(cert: x509.Certificate) -> PeerIdentity:
    """Who the certificate names and whether it is for client authentication: facts of the
    certificate alone, whatever the time (its validity is :meth:`PeerIdentity.check_validity`)."""
    _check_purpose(cert)
    sans = _extension(cert, x509.SubjectAlternativeName)
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier) if sans else []
    named: list[tuple[SubjectKind, str]] = []
    for kind, prefix in URI_PREFIXES.items():
        try:
            named += [(kind, i) for i in (id_from_uri(u, prefix) for u in uris) if i is not None]
        except InvalidDeviceId as exc:
            raise NotAuthorised(
                f"the client certificate names an invalid {kind}: {exc.message}"
            ) from exc
    if not named:
        raise NotAuthorised("the client certificate names no fleetgate device or station (URI SAN)")
    if len(named) > 1:
        shown = ", ".join(f"{kind}:{i}" for kind, i in named)
        raise NotAuthorised(
            f"the client certificate names {len(named)} fleetgate identities ({shown}); "
            "a fleetgate certificate names exactly one device or station"
        )
    kind, peer_id = named[0]
    return PeerIdentity(
        kind, peer_id, cert.serial_number, cert.not_valid_after_utc, cert.not_valid_before_utc
    )


def _check_purpose(cert: x509.Certificate) -> None:
    """An end-entity certificate for a signing key, for client authentication."""
    basic = _extension(cert, x509.BasicConstraints)
    if basic is not None and basic.ca:
        raise NotAuthorised("the client certificate is a CA certificate (CA:TRUE), not a device's")
    usage = _extension(cert, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise NotAuthorised("the client certificate lacks the digitalSignature key usage")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise NotAuthorised("the client certificate lacks the clientAuth extended key usage")


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    """The certificate's extension of that type, or None when it has none."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
