"""The fleet's private CA: an offline-style root and an online issuing intermediate.

Both keys are encrypted at rest with the operator's passphrase; the root key is only decrypted by
``ca init``. Everything day-to-day (device, station and server certificates, CRLs) is signed by
the issuing key. File layout under ``<home>/ca``::

    root.crt  root.key (encrypted)  issuing.crt  issuing.key (encrypted)
    chain.pem (issuing + root)      server.crt (+ issuing)  server.key (0600)   crl.der
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import profiles
from enrollment.profiles import Issuer, Profile, RevocationPointers, Subject
from fleetgate.config import Config
from fleetgate.errors import CANotInitialised, CAPassphraseError, ConfigError
from fleetgate.keyfiles import (
    load_certificates,
    load_private_key,
    write_certificates,
    write_private_key,
)

ROOT_VALIDITY = dt.timedelta(days=365 * 20)
ISSUING_VALIDITY = dt.timedelta(days=365 * 5)
SERVER_RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CAPaths:
    """Where one data directory keeps its CA material."""

    directory: Path

    @property
    def root_cert(self) -> Path:
        return self.directory / "root.crt"

    @property
    def root_key(self) -> Path:
        return self.directory / "root.key"

    @property
    def issuing_cert(self) -> Path:
        return self.directory / "issuing.crt"

    @property
    def issuing_key(self) -> Path:
        return self.directory / "issuing.key"

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def crl(self) -> Path:
        return self.directory / "crl.der"


@dataclass(frozen=True)
class TrustAnchors:
    """The public half of the CA, enough to verify fleet certificates."""

    root: x509.Certificate
    issuing: x509.Certificate


class CertificateAuthority:
    """The issuing CA, unlocked: signs certificates and CRLs with the issuing key."""

    def __init__(
        self, config: Config, anchors: TrustAnchors, issuing_key: ec.EllipticCurvePrivateKey
    ):
        self.config = config
        self.anchors = anchors
        self._issuer = Issuer(key=issuing_key, certificate=anchors.issuing)

    @property
    def issuer(self) -> Issuer:
        return self._issuer

    def pointers(self) -> RevocationPointers:
        return RevocationPointers(crl_url=self.config.ca.crl_url, ocsp_url=self.config.ca.ocsp_url)

    def issue(
        self,
        profile: Profile,
        subject: Subject,
        public_key: ec.EllipticCurvePublicKey,
        validity: dt.timedelta,
        now: dt.datetime | None = None,
        policies: Sequence[x509.ObjectIdentifier] = (),
    ) -> x509.Certificate:
        return profiles.build_certificate(
            profile,
            subject=subject,
            public_key=public_key,
            issuer=self._issuer,
            validity=validity,
            now=now or dt.datetime.now(dt.UTC),
            pointers=self.pointers(),
            policies=policies,
        )


def ca_paths(config: Config) -> CAPaths:
    return CAPaths(config.ca_dir)


def is_initialised(config: Config) -> bool:
    return ca_paths(config).issuing_key.exists()


def init_ca(config: Config, *, curve: str | None = None, force: bool = False) -> TrustAnchors:
    """Create the root and issuing CA and the enrollment server's certificate."""
    paths = ca_paths(config)
    if paths.issuing_key.exists() and not force:
        raise ConfigError(
            f"a CA already exists in {paths.directory}; pass --force to replace it "
            "(every certificate it issued stops verifying)"
        )
    passphrase = config.read_passphrase()
    if not passphrase or len(passphrase) < 8:
        raise CAPassphraseError(
            "CA keys are encrypted at rest: set FLEETGATE_CA_PASSPHRASE (8+ characters) "
            "or ca.passphrase_file before `fleetgate ca init`"
        )
    curve_name = curve or config.ca.root_curve
    if curve_name not in profiles.CURVES:
        raise ConfigError(f"root curve {curve_name!r} is not supported; use P-256 or P-384")
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(profiles.CURVES[curve_name])
    root = profiles.build_certificate(
        profiles.ROOT,
        subject=Subject(common_name="fleetgate root CA"),
        public_key=root_key.public_key(),
        issuer=Issuer(key=root_key, certificate=None),
        validity=ROOT_VALIDITY,
        now=now,
    )
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = profiles.build_certificate(
        profiles.ISSUING,
        subject=Subject(common_name="fleetgate issuing CA"),
        public_key=issuing_key.public_key(),
        issuer=Issuer(key=root_key, certificate=root),
        validity=ISSUING_VALIDITY,
        now=now,
    )
    paths.directory.mkdir(parents=True, exist_ok=True)
    paths.directory.chmod(0o700)
    write_private_key(paths.root_key, root_key, passphrase)
    write_private_key(paths.issuing_key, issuing_key, passphrase)
    write_certificates(paths.root_cert, [root])
    write_certificates(paths.issuing_cert, [issuing])
    write_certificates(paths.chain, [issuing, root])
    anchors = TrustAnchors(root=root, issuing=issuing)
    authority = CertificateAuthority(config, anchors, issuing_key)
    ensure_server_certificate(
        config, enrollment_server_credentials(config), ca=authority, replace=True
    )
    return anchors


def load_anchors(config: Config) -> TrustAnchors:
    paths = ca_paths(config)
    if not paths.issuing_cert.exists():
        raise CANotInitialised(
            f"no CA in {paths.directory}: run `fleetgate ca init` (FLEETGATE_HOME={config.home})"
        )
    return TrustAnchors(
        root=load_certificates(paths.root_cert)[0], issuing=load_certificates(paths.issuing_cert)[0]
    )


def load_ca(config: Config) -> CertificateAuthority:
    """Unlock the issuing CA with the configured passphrase."""
    anchors = load_anchors(config)
    key = load_private_key(ca_paths(config).issuing_key, config.read_passphrase())
    return CertificateAuthority(config, anchors, key)


@dataclass(frozen=True)
class ServerCredentials:
    """Where a TLS server's certificate (with the issuing CA) and key live, and its names."""

    cert: Path
    key: Path
    names: tuple[str, ...]


def enrollment_server_credentials(config: Config) -> ServerCredentials:
    paths = ca_paths(config)
    return ServerCredentials(paths.server_cert, paths.server_key, config.enrollment.server_names)


def ensure_server_certificate(
    config: Config,
    credentials: ServerCredentials,
    *,
    ca: CertificateAuthority | None = None,
    replace: bool = False,
) -> ServerCredentials:
    """Issue a serverAuth certificate when missing, naming other hosts, or near expiry.

    Without ``ca`` the CA is unlocked only if a certificate must be issued, so a server whose
    certificate is current runs without the CA passphrase.
    """
    if not replace and _is_current(credentials):
        return credentials
    authority = ca or load_ca(config)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue(
        profiles.SERVER,
        profiles.server_subject(credentials.names),
        key.public_key(),
        dt.timedelta(days=config.ca.server_validity_days),
    )
    write_private_key(credentials.key, key)
    write_certificates(credentials.cert, [cert, authority.anchors.issuing])
    return credentials


def renew_server_certificate_if_due(
    config: Config, credentials: ServerCredentials, *, ca: CertificateAuthority
) -> bool:
    """For a running server: reissue a due certificate; True when new files were written."""
    if _is_current(credentials):
        return False
    ensure_server_certificate(config, credentials, ca=ca, replace=True)
    return True


def _is_current(credentials: ServerCredentials) -> bool:
    if not (credentials.cert.exists() and credentials.key.exists()):
        return False
    cert = load_certificates(credentials.cert)[0]
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = set(sans.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return names == set(credentials.names) and remaining > SERVER_RENEW_BEFORE
