"""Rotating the fleet's CAs while devices keep connecting (``fleetgate ca rotate`` / ``retire``).

A rotation writes the new CA's key and certificate under ``ca/authorities/`` and as the current
``issuing.*`` (and ``root.*``), rewrites ``chain.pem``, and only then records the new CA in the
registry, which is how every running process learns of it: the enrollment service signs with the
registry's active issuing CA from its next poll on, and brokers add each CA that is not retired
to their trust (``enrollment.authorities``). The old CAs stay trusted, and keep signing their own
CRLs and OCSP answers, until ``retire``: refused while an active device still holds a certificate
from the CA, unless forced, which revokes those certificates (cessationOfOperation).

A root rotation makes a new root (the same name, a new key), cross-certifies the two roots both
ways, and makes a new issuing CA under the new root. Devices learn the new root as they renew
(EST ``cacerts``, where the cross certificate links it to the root they trust); retiring the
old root withdraws it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enrollment import profiles
from enrollment.ca import (
    ISSUING_VALIDITY,
    ROOT_VALIDITY,
    CAPaths,
    ca_paths,
    copy_ca_key,
    has_key,
    load_anchors,
    load_ca_key,
    new_ca_key,
    store_ca_key,
)
from enrollment.profiles import Issuer, Subject
from enrollment.registry import AuditRecord, Registry
from enrollment.registry.authorities import AuthorityRecord, authority_key_id
from enrollment.registry.models import AuthorityRole, AuthorityState
from fleetgate.config import Config
from fleetgate.errors import CAPassphraseError, FleetgateError, InvalidStateChange
from fleetgate.keyfiles import write_certificates

ACTIVE, TRUSTED = AuthorityState.ACTIVE, AuthorityState.TRUSTED


class DevicesStillOnCA(FleetgateError):
    """``ca retire`` without ``--force`` while active devices still hold its certificates."""

    code = "devices_on_ca"
    http_status = 409


@dataclass(frozen=True)
class Retirement:
    """What ``ca retire`` did: the CAs it retired and the certificates it cut off."""

    retired: tuple[AuthorityRecord, ...]
    cut_off: tuple[str, ...]


def _stamp(now: dt.datetime) -> str:
    """Tells generations apart in a CA's name: devices chain by subject, which must differ."""
    return now.strftime("%Y-%m-%d %H:%M:%S")


def adopt(
    config: Config, registry: Registry, actor: str, audit: AuditRecord | None = None
) -> list[AuthorityRecord]:
    """The registry's CA rows; a CA made before rotation existed (none recorded) is recorded
    first (audited as ``audit``, or as ca.adopt), and its files copied under ``authorities/``."""
    records = registry.authorities()
    if any(not r.retired for r in records):
        return records
    anchors = load_anchors(config)
    paths = ca_paths(config)
    _keep_generation(paths, anchors.root, paths.root_key)
    _keep_generation(paths, anchors.issuing, paths.issuing_key)
    registry.record_authorities(
        [
            (anchors.root, AuthorityRole.ROOT, ACTIVE),
            (anchors.issuing, AuthorityRole.ISSUING, ACTIVE),
        ],
        audit=audit or AuditRecord(actor, "ca.adopt", "ok", None, _describe(anchors.issuing)),
    )
    return registry.authorities()


def register_new_ca(config: Config, registry: Registry, audit: AuditRecord) -> None:
    """After ``ca init``: record its root and issuing CA (audited as ``audit``), retiring any
    earlier CA (``--force``)."""
    actor = audit.actor
    earlier = registry.authorities(include_retired=False)
    if earlier:
        registry.retire_authorities(
            [r.certificate for r in earlier],
            issuers=[r.key_id for r in earlier if r.role == AuthorityRole.ISSUING],
            audit=AuditRecord(actor, "ca.retire", "ok", None, "replaced by ca init --force"),
        )
    adopt(config, registry, actor, audit)


@contextmanager
def _refusal_audited(registry: Registry, action: str, actor: str) -> Iterator[None]:
    """A refused rotation step (a :class:`FleetgateError`) is audited, then re-raised."""
    try:
        yield
    except FleetgateError as exc:
        registry.audit(AuditRecord(actor, action, "refused", None, f"{exc.code}: {exc.message}"))
        exc.audited = True
        raise


def rotate_issuing(config: Config, registry: Registry, *, actor: str) -> x509.Certificate:
    """A new issuing CA under the current root; it signs from now on, the old one is trusted."""
    with _refusal_audited(registry, "ca.rotate.issuing", actor):
        return _rotate_issuing(config, registry, actor)


@dataclass(frozen=True)
class _Start:
    """What every rotation begins with: the recorded CAs and the unlocked current root."""

    records: list[AuthorityRecord]
    paths: CAPaths
    root: Issuer
    now: dt.datetime


def _start(config: Config, registry: Registry, actor: str) -> _Start:
    records = adopt(config, registry, actor)
    paths = ca_paths(config)
    root_cert = load_anchors(config).root
    root = Issuer(key=_unlock(config, paths.root_key, "root"), certificate=root_cert)
    return _Start(records, paths, root, dt.datetime.now(dt.UTC))


def _rotate_issuing(config: Config, registry: Registry, actor: str) -> x509.Certificate:
    start = _start(config, registry, actor)
    issuing = _new_issuing(config, start.paths, start.root, start.now)
    _record(
        config,
        registry,
        [(issuing, AuthorityRole.ISSUING, ACTIVE)],
        demote=[r for r in start.records if r.role == AuthorityRole.ISSUING],
        audit=AuditRecord(actor, "ca.rotate.issuing", "ok", None, _describe(issuing)),
    )
    return issuing


def _record(
    config: Config,
    registry: Registry,
    added: list[tuple[x509.Certificate, AuthorityRole, AuthorityState]],
    *,
    demote: list[AuthorityRecord],
    audit: AuditRecord,
) -> None:
    """Record the new CAs (the last step: running processes follow the registry) and rewrite
    ``chain.pem``; the active CAs among ``demote`` become trusted."""
    active = [r.key_id for r in demote if r.state == ACTIVE]
    registry.record_authorities(added, demote=active, audit=audit)
    write_trust_file(config, registry.authorities(include_retired=False))


def rotate_root(config: Config, registry: Registry, *, actor: str) -> x509.Certificate:
    """A new root, cross-certified both ways with the current one, and a new issuing CA under
    it that signs from now on. Returns the new root."""
    with _refusal_audited(registry, "ca.rotate.root", actor):
        return _rotate_root(config, registry, actor)


def _rotate_root(config: Config, registry: Registry, actor: str) -> x509.Certificate:
    start = _start(config, registry, actor)
    old_root, now = start.root, start.now
    assert old_root.certificate is not None
    key, token_label = _new_key(config, config.ca.root_curve, config.ca.pkcs11_root_key_label, now)
    # The same name, a new key (RFC 4210 5.3.1.1's root key update): the cross certificates are
    # then self-issued, which RFC 5280 6.1.4 leaves out of path lengths, so a device that trusts
    # only the old root (path length 1) verifies leaf -> new issuing CA -> cross -> old root.
    subject = Subject(common_name=_common_name(old_root.certificate))
    root = _build(profiles.ROOT, subject, key.public_key(), Issuer(key, None), ROOT_VALIDITY, now)
    new_root = Issuer(key=key, certificate=root)
    # The new root's key certified by the old root (devices trusting the old root reach the new
    # one through it), and the old root's key by the new one.
    new_by_old = _build(profiles.ROOT, subject, key.public_key(), old_root, ROOT_VALIDITY, now)
    old_key = old_root.certificate.public_key()
    assert isinstance(old_key, ec.EllipticCurvePublicKey)  # fleetgate roots are EC
    old_by_new = _build(profiles.ROOT, subject, old_key, new_root, ROOT_VALIDITY, now)
    paths = start.paths
    _install(config, root, key, token_label, current=(paths.root_cert, paths.root_key))
    issuing = _new_issuing(config, paths, new_root, now)
    _record(
        config,
        registry,
        [
            (root, AuthorityRole.ROOT, ACTIVE),
            (new_by_old, AuthorityRole.CROSS, TRUSTED),
            (old_by_new, AuthorityRole.CROSS, TRUSTED),
            (issuing, AuthorityRole.ISSUING, ACTIVE),
        ],
        demote=[r for r in start.records if r.role != AuthorityRole.CROSS],
        audit=AuditRecord(
            actor, "ca.rotate.root", "ok", None, f"{_describe(root)}; {_describe(issuing)}"
        ),
    )
    return root


def retire(
    config: Config, registry: Registry, key_id: str, *, force: bool, actor: str
) -> Retirement:
    """Retire a CA that no longer signs: an issuing CA, or a root with everything under it.

    Refused (and audited) while active devices still hold a certificate from it, unless
    ``force``; then their certificates are revoked and :attr:`Retirement.cut_off` names them.
    """
    records = registry.authorities(include_retired=False)
    with _refusal_audited(registry, "ca.retire", actor):
        target = registry.authority(key_id)
        retiring = _retiring_with(target, records)
        issuing_ids = [r.key_id for r in retiring if r.role == AuthorityRole.ISSUING]
        holders = registry.holders_on(issuing_ids)
        if holders and not force:
            shown = ", ".join(holders[:10]) + (" ..." if len(holders) > 10 else "")
            raise DevicesStillOnCA(
                f"{len(holders)} active device(s) or station(s) still hold a certificate from "
                f"{target.certificate.subject.rfc4514_string()} ({shown}): let devices renew "
                "(`fleetgate ca status` counts them), give stations new certificates, or pass "
                "--force to cut them off"
            )
    detail = "; ".join(_describe(r.certificate) for r in retiring if r.role != AuthorityRole.CROSS)
    cut = registry.retire_authorities(
        [r.certificate for r in retiring],
        issuers=issuing_ids,
        audit=AuditRecord(
            actor,
            "ca.retire",
            "ok",
            None,
            detail + (f"; forced: cut off {', '.join(holders)}" if holders else ""),
        ),
    )
    write_trust_file(config, registry.authorities(include_retired=False))
    return Retirement(tuple(retiring), tuple(cut))


def _retiring_with(
    target: AuthorityRecord, records: list[AuthorityRecord]
) -> list[AuthorityRecord]:
    """The CA certificates that go with ``target``: a root takes its cross certificates and the
    issuing CAs under it. Refuses anything that still signs."""
    if target.retired:
        raise InvalidStateChange(f"{target.certificate.subject.rfc4514_string()} is retired")
    if target.role == AuthorityRole.ROOT:
        kid = target.key_id
        retiring = [
            r
            for r in records
            if r.key_id == kid or (r.issuer_key_id == kid and r.role != AuthorityRole.ROOT)
        ]
    else:
        retiring = [r for r in records if r.key_id == target.key_id]
    if any(r.state == ACTIVE for r in retiring):
        raise InvalidStateChange(
            f"{target.certificate.subject.rfc4514_string()} is the active {target.role} CA or "
            "signs under it: rotate first (`fleetgate ca rotate issuing` or `rotate root`)"
        )
    return retiring


def write_trust_file(config: Config, records: list[AuthorityRecord]) -> None:
    """``chain.pem``: every CA certificate not retired, the active issuing CA first."""
    order = {AuthorityRole.ISSUING: 0, AuthorityRole.CROSS: 1, AuthorityRole.ROOT: 2}
    ranked = sorted(records, key=lambda r: (order[r.role], r.state != ACTIVE))
    write_certificates(ca_paths(config).chain, [r.certificate for r in ranked])


def _new_issuing(
    config: Config, paths: CAPaths, root: Issuer, now: dt.datetime
) -> x509.Certificate:
    """Make, store and install as current a new issuing CA under ``root``."""
    key, token_label = _new_key(config, "P-256", config.ca.pkcs11_key_label, now)
    subject = Subject(common_name=f"fleetgate issuing CA {_stamp(now)}")
    issuing = _build(profiles.ISSUING, subject, key.public_key(), root, ISSUING_VALIDITY, now)
    _install(config, issuing, key, token_label, current=(paths.issuing_cert, paths.issuing_key))
    return issuing


def _new_key(
    config: Config, curve: str, label: str, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, str | None]:
    """A CA key, in the token under ``<label>-<time>`` when the configuration puts it there."""
    token_label = f"{label}-{now:%Y%m%d%H%M%S}" if label else ""
    return new_ca_key(config, curve=curve, token_label=token_label)


def _install(
    config: Config,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    token_label: str | None,
    *,
    current: tuple[Path, Path],
) -> None:
    """Store a new CA under ``authorities/<key id>`` and as the current one (``current``: its
    certificate and key paths)."""
    paths = ca_paths(config)
    stem = paths.authority(authority_key_id(cert))
    paths.authorities.mkdir(mode=0o700, parents=True, exist_ok=True)
    passphrase = _passphrase(config)
    for cert_path, key_path in ((stem.with_suffix(".crt"), stem.with_suffix(".key")), current):
        store_ca_key(key_path, key, token_label, passphrase)
        write_certificates(cert_path, [cert])


def _build(
    profile: profiles.Profile,
    subject: Subject,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer,
    validity: dt.timedelta,
    now: dt.datetime,
) -> x509.Certificate:
    return profiles.build_certificate(
        profile, subject=subject, public_key=public_key, issuer=issuer, validity=validity, now=now
    )


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _keep_generation(paths: CAPaths, cert: x509.Certificate, key_path: Path) -> None:
    """Copy a current CA's certificate and key under ``authorities/<key id>``."""
    stem = paths.authority(authority_key_id(cert))
    paths.authorities.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_certificates(stem.with_suffix(".crt"), [cert])
    if has_key(key_path):
        copy_ca_key(key_path, stem.with_suffix(".key"))


def _unlock(config: Config, key_path: Path, role: str) -> ec.EllipticCurvePrivateKey:
    if not has_key(key_path):
        raise CAPassphraseError(f"the {role} CA key {key_path} is not on this host")
    return load_ca_key(config, key_path)


def _passphrase(config: Config) -> bytes:
    """The passphrase a new file key is encrypted with (a token key needs none)."""
    return config.read_passphrase() or b""


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} key {authority_key_id(cert)[:16]}"
