"""Which CAs a running process signs with and trusts, as the registry's CA rows say.

Two readers: the enrollment service (:func:`load_issuing_cas`: the active issuing CA signs, every
issuing CA not retired answers OCSP and signs its own CRL) and every TLS server that verifies
fleet certificates (:class:`TrustedCAs`: a CA certificate from the registry is trusted only if
it chains to one the process already trusts, so a registry writer cannot slip in a CA of its
own; a new root is reached through its cross certificate).

OpenSSL can add trust anchors to a live ``SSLContext`` (new handshakes see them) but not remove
them: a retired CA stays in a running process's context until it restarts, and what refuses its
devices meanwhile is the registry (``ca retire`` revokes the certificates it still covered).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from enrollment.ca import CertificateAuthority, TrustAnchors, ca_paths, load_ca, load_ca_key
from enrollment.profiles import Issuer
from enrollment.registry.authorities import AuthorityRecord, authority_key_id
from enrollment.registry.models import AuthorityRole, AuthorityState
from fleetgate.config import Config
from fleetgate.keyfiles import load_certificates


@dataclass(frozen=True)
class IssuingCAs:
    """The CAs an enrollment service works with at one moment."""

    signer: CertificateAuthority
    """The active issuing CA: every new certificate."""
    issuers: tuple[Issuer, ...]
    """Every issuing CA not retired, the signer first: OCSP answers and CRLs."""
    crl_names: dict[str, Issuer]
    """Each issuer by the name its certificates' CRL URL ends with ("" for ``ca.crl_url``)."""
    trusted: tuple[x509.Certificate, ...]
    """Every CA certificate not retired, as EST ``cacerts`` lists them (signer and its root
    first)."""


def load_issuing_cas(
    config: Config, records: Sequence[AuthorityRecord], loaded: dict[str, Issuer]
) -> IssuingCAs:
    """The CAs the registry's ``records`` describe (all of them, retired too), reusing keys in
    ``loaded`` (by key id) and unlocking the rest. Without records (a CA never rotated), the
    current files."""
    if not records:
        ca = load_ca(config)
        trusted = tuple(load_certificates(ca_paths(config).chain))
        return IssuingCAs(ca, (ca.issuer,), {"": ca.issuer}, trusted)
    live = [r for r in records if not r.retired]
    issuing = [r for r in records if r.role == AuthorityRole.ISSUING]
    first_issuing = issuing[0].key_id if issuing else ""
    active = next(
        r for r in live if r.role == AuthorityRole.ISSUING and r.state == AuthorityState.ACTIVE
    )
    root = next(
        r.certificate
        for r in records
        if r.role == AuthorityRole.ROOT and r.key_id == active.issuer_key_id
    )
    issuers = {
        r.key_id: _issuer(config, r, loaded) for r in live if r.role == AuthorityRole.ISSUING
    }
    # A device that still trusts only an older root reaches this CA's root through the cross
    # certificate the older root signed for it.
    root_id = authority_key_id(root)
    crosses = tuple(
        r.certificate for r in live if r.role == AuthorityRole.CROSS and r.key_id == root_id
    )
    signer = CertificateAuthority(
        config,
        TrustAnchors(root=root, issuing=active.certificate),
        issuers[active.key_id].key,
        crl_name="" if active.key_id == first_issuing else active.key_id,
        presented=(active.certificate, *crosses),
    )
    ordered = [issuers.pop(active.key_id), *issuers.values()]
    crl_names = {("" if i == first_issuing else i): issuer for i, issuer in _by_id(ordered)}
    rank = {AuthorityRole.ISSUING: 0, AuthorityRole.ROOT: 1, AuthorityRole.CROSS: 2}
    rest = sorted(
        (r for r in live if r.certificate not in (active.certificate, root)),
        key=lambda r: (rank[r.role], r.state != AuthorityState.ACTIVE),
    )
    trusted = (active.certificate, root, *(r.certificate for r in rest))
    return IssuingCAs(signer, tuple(ordered), crl_names, trusted)


def _by_id(issuers: Iterable[Issuer]) -> Iterable[tuple[str, Issuer]]:
    for issuer in issuers:
        assert issuer.certificate is not None
        yield authority_key_id(issuer.certificate), issuer


def _issuer(config: Config, record: AuthorityRecord, loaded: dict[str, Issuer]) -> Issuer:
    """The issuing CA's key, unlocked once per process."""
    issuer = loaded.get(record.key_id)
    if issuer is None:
        paths = ca_paths(config)
        key_path = paths.authority(record.key_id).with_suffix(".key")
        if not (key_path.exists() or key_path.with_suffix(".p11").exists()):
            key_path = paths.issuing_key  # a CA recorded before it was copied (adopted)
        issuer = Issuer(key=load_ca_key(config, key_path), certificate=record.certificate)
        loaded[record.key_id] = issuer
    return issuer


# -- trust ------------------------------------------------------------------------------------


def chains_to(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """``issuer`` is a CA certificate whose key signed ``cert``, under the name ``cert`` names."""
    if issuer.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        basic = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return basic.ca


def accept(
    trusted: Sequence[x509.Certificate], candidates: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The ``candidates`` (CA certificates) that chain to ``trusted``, directly or through other
    accepted candidates; anything else is left out."""
    known = list(trusted)
    pending = [c for c in candidates if c not in known]
    accepted: list[x509.Certificate] = []
    progress = True
    while pending and progress:
        progress = False
        for cert in list(pending):
            if any(chains_to(anchor, cert) for anchor in known):
                known.append(cert)
                accepted.append(cert)
                pending.remove(cert)
                progress = True
    return accepted


class TrustedCAs:
    """The fleet CA certificates an ``SSLContext`` verifies clients with, growing as rotated
    CAs chain to the ones it started with."""

    def __init__(self, context: ssl.SSLContext, initial: Sequence[x509.Certificate]) -> None:
        self._context = context
        self._trusted = list(initial)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(self._trusted)

    def add(self, candidates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        """Trust each candidate that chains to a trusted CA (new handshakes from now on);
        returns those newly trusted."""
        accepted = accept(self._trusted, candidates)
        for cert in accepted:
            self._context.load_verify_locations(
                cadata=cert.public_bytes(serialization.Encoding.PEM).decode()
            )
            self._trusted.append(cert)
        return accepted
