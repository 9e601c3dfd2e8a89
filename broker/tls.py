"""The broker's side of TLS: its certificate, the mutual-TLS context, handshake-failure labels.

The handshake itself runs in :func:`fleetgate.tls.serve_tls`, which reports each refused
handshake with OpenSSL's reason; :func:`handshake_label` folds those reasons into the few labels
``/metrics`` counts by.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from sqlalchemy.exc import SQLAlchemyError

from enrollment.authorities import TrustedCAs
from enrollment.ca import ServerCredentials, ca_paths
from enrollment.registry import Registry
from fleetgate.config import Config
from fleetgate.errors import ConfigError
from fleetgate.keyfiles import load_certificates
from fleetgate.tls import server_context

log = logging.getLogger("fleetgate.broker")

_HANDSHAKE_LABELS = (
    ("no certificate", "no_client_certificate"),
    ("expired", "certificate_expired"),
    ("not yet valid", "certificate_not_yet_valid"),
    ("unable to get local issuer", "unknown_ca"),
    ("self-signed", "unknown_ca"),
    ("self signed", "unknown_ca"),
    ("purpose", "wrong_purpose"),
    ("timed out", "timeout"),
    ("version", "protocol_version"),
    ("unsupported protocol", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
)


def broker_credentials(config: Config) -> ServerCredentials:
    """``ca/broker.crt`` (+ issuing CA) and ``ca/broker.key``, for ``broker.server_names``."""
    directory = ca_paths(config).directory
    return ServerCredentials(
        directory / "broker.crt", directory / "broker.key", config.broker.server_names
    )


def broker_context(config: Config, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 (1.2 only if ``broker.allow_tls12``), client certificate required and verified
    against the fleet CA chain, AEAD only, no compression or renegotiation, ChaCha20 honoured.

    Every CA in ``ca/chain.pem`` is a trust anchor (OpenSSL's partial-chain flag): a device's
    chain ends at the issuing CA that signed it, whose validity OpenSSL still checks on every
    handshake, instead of going on to the root. That the root certifies the issuing CA is
    checked here, once (:func:`check_fleet_chain`), not again on every connect: one ECDSA
    verification of the ~1.7 ms of CPU a mutual-TLS connect costs the broker.
    """
    chain = ca_paths(config).chain
    check_fleet_chain(load_certificates(chain), now=dt.datetime.now(dt.UTC), source=chain)
    context = server_context(
        cert_chain=cert,
        key=key,
        client_ca=chain,
        client_cert="required",
        allow_tls12=config.broker.allow_tls12,
    )
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # ChaCha20 honoured: server_context
    return context


def fleet_trust(config: Config, context: ssl.SSLContext) -> TrustedCAs:
    """What ``context`` trusts at start (``ca/chain.pem``), ready to grow with a rotation."""
    return TrustedCAs(context, load_certificates(ca_paths(config).chain))


async def follow_fleet_cas(
    trust: TrustedCAs, registry: Registry, *, interval_s: float, changed: asyncio.Event
) -> None:
    """Trust a rotated CA without a restart: every ``interval_s``, the registry's CA
    certificates that are not retired and chain to a CA already trusted (a new issuing CA under
    the root, a new root through its cross certificate) join the broker's trust, for the
    handshakes that follow. A retired CA's devices are refused by the registry (``ca retire``
    revokes their certificates); it leaves the TLS trust at the next restart (``chain.pem``)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            records = await asyncio.to_thread(registry.authorities, include_retired=False)
        except (OSError, SQLAlchemyError) as exc:
            log.warning("reading the fleet CAs failed: %s", exc)
            continue
        added = trust.add([r.certificate for r in records])
        if added:
            log.info(
                "trusting rotated fleet CA(s)",
                extra={"added": [c.subject.rfc4514_string() for c in added]},
            )
            changed.set()


def check_fleet_chain(certs: list[x509.Certificate], *, now: dt.datetime, source: Path) -> None:
    """Each CA in the broker's trust file is a current self-signed root of that file, or is
    signed by one: nothing else may become a trust anchor. Raises :class:`ConfigError`."""
    roots = [c for c in certs if c.issuer == c.subject and _signs(c, c)]
    if not roots:
        raise ConfigError(f"{source} holds no self-signed root CA: copy the fleet's ca/chain.pem")
    for cert in certs:
        name = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ConfigError(
                f"CA certificate {name} in {source} is not valid now (valid "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        if cert not in roots and not any(_signs(root, cert) for root in roots):
            raise ConfigError(
                f"CA certificate {name} in {source} is not signed by the root CA in that file: "
                "copy the fleet's ca/chain.pem unchanged"
            )


def _signs(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def handshake_label(reason: str) -> str:
    """A metrics label for a refused handshake's reason (a closed set, unlike the reasons)."""
    lowered = reason.lower()
    for needle, label in _HANDSHAKE_LABELS:
        if needle in lowered:
            return label
    return "other"
