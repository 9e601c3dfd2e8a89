"""The fleet's private CA: an offline-style root and an online issuing intermediate.

Both keys are encrypted at rest with the operator's passphrase (``ca.key_store = "file"``, the
default) or held in a PKCS#11 token (``"pkcs11"``: then ``<name>.p11`` names the key's label
instead of ``<name>.key``); the root key is only used by ``ca init`` and ``ca rotate``.
Everything day-to-day (device, station and server certificates, CRLs, OCSP) is signed by the
issuing key. File layout under ``<home>/ca``::

    root.crt  root.key (encrypted)  issuing.crt  issuing.key (encrypted): the current ones
    chain.pem (every CA certificate not retired: what brokers and the EST server trust)
    server.crt (+ issuing)  server.key (0600)  crl.der
    authorities/<key id>.crt, .key or .p11: every CA generation (``enrollment.rotation``)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import profiles
from enrollment.cert_template import CertificateTemplate, templated
from enrollment.profiles import Issuer, Profile, RevocationPointers, Subject
from fleetgate.config import Config
from fleetgate.errors import CANotInitialised, CAPassphraseError, ConfigError
from fleetgate.keyfiles import (
    load_certificates,
    load_private_key,
    write_atomic,
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

    @property
    def authorities(self) -> Path:
        return self.directory / "authorities"

    def authority(self, key_id: str) -> Path:
        """Where one CA generation's certificate (``.crt``) and key (``.key``/``.p11``) live."""
        return self.authorities / key_id

    def crl_of(self, key_id: str) -> Path:
        return self.directory / f"crl-{key_id}.der"


_TemplateKey = tuple[Profile, RevocationPointers, tuple[x509.ObjectIdentifier, ...]]


@dataclass(frozen=True)
class TrustAnchors:
    """The public half of the CA, enough to verify fleet certificates."""

    root: x509.Certificate
    issuing: x509.Certificate


class CertificateAuthority:
    """The issuing CA, unlocked: signs certificates and CRLs with the issuing key.

    ``crl_name`` is empty for the fleet's first issuing CA, whose certificates name
    ``ca.crl_url`` itself; a CA made by a rotation names ``<crl_url>/<its key id>`` (each CA
    signs a CRL of its own). ``presented`` are the CA certificates a server certificate of this
    CA is sent with: the issuing CA, and during a root rotation the new root certified by the
    old, so that devices still trusting only the old root verify it.
    """

    def __init__(
        self,
        config: Config,
        anchors: TrustAnchors,
        issuing_key: ec.EllipticCurvePrivateKey,
        *,
        crl_name: str = "",
        presented: tuple[x509.Certificate, ...] = (),
    ):
        self.config = config
        self.anchors = anchors
        self._issuer = Issuer(key=issuing_key, certificate=anchors.issuing)
        self.crl_name = crl_name
        self.presented = presented or (anchors.issuing,)
        self._templates: dict[_TemplateKey, CertificateTemplate] = {}

    @property
    def issuer(self) -> Issuer:
        return self._issuer

    def pointers(self) -> RevocationPointers:
        crl_url = self.config.ca.crl_url
        if crl_url and self.crl_name:
            crl_url = f"{crl_url.rstrip('/')}/{self.crl_name}"
        return RevocationPointers(crl_url=crl_url, ocsp_url=self.config.ca.ocsp_url)

    def issue(
        self,
        profile: Profile,
        subject: Subject,
        public_key: ec.EllipticCurvePublicKey,
        validity: dt.timedelta,
        now: dt.datetime | None = None,
        policies: Sequence[x509.ObjectIdentifier] = (),
    ) -> x509.Certificate:
        """A certificate of ``profile`` signed by the issuing key: from the profile's template
        when the subject has one (:mod:`enrollment.cert_template`), else built by cryptography."""
        now = now or dt.datetime.now(dt.UTC)
        if not templated(subject):
            return profiles.build_certificate(
                profile,
                subject=subject,
                public_key=public_key,
                issuer=self._issuer,
                validity=validity,
                now=now,
                pointers=self.pointers(),
                policies=policies,
            )
        pointers = self.pointers()
        key = (profile, pointers, tuple(policies))
        template = self._templates.get(key)
        if template is None:
            template = CertificateTemplate.build(
                profile, issuer=self._issuer, pointers=pointers, policies=policies
            )
            self._templates[key] = template
        not_before, not_after = profiles.validity_window(self._issuer, now, validity)
        return template.issue(
            subject,
            public_key,
            serial=x509.random_serial_number(),
            not_before=not_before,
            not_after=not_after,
        )


def ca_paths(config: Config) -> CAPaths:
    return CAPaths(config.ca_dir)


def is_initialised(config: Config) -> bool:
    return has_key(ca_paths(config).issuing_key)


# -- where a CA key lives: an encrypted file, or a label in a PKCS#11 token --------------------


def _token_reference(key_path: Path) -> Path:
    return key_path.with_suffix(".p11")


def has_key(key_path: Path) -> bool:
    """A key stored at ``key_path`` (``x.key``), in a file or as a token reference (``x.p11``)."""
    return key_path.exists() or _token_reference(key_path).exists()


def new_ca_key(
    config: Config, *, curve: str, token_label: str
) -> tuple[ec.EllipticCurvePrivateKey, str | None]:
    """A new CA key and its token label: generated in the token when ``token_label`` is set and
    ``ca.key_store`` is "pkcs11", else in memory (None: to be written to an encrypted file)."""
    if config.ca.key_store == "pkcs11" and token_label:
        from enrollment import pkcs11

        return pkcs11.generate_key(pkcs11.token_settings(config), token_label, curve), token_label
    if config.ca.key_store not in {"file", "pkcs11"}:
        raise ConfigError(f'ca.key_store must be "file" or "pkcs11", not {config.ca.key_store!r}')
    return ec.generate_private_key(profiles.CURVES[curve]), None


def store_ca_key(
    key_path: Path, key: ec.EllipticCurvePrivateKey, token_label: str | None, passphrase: bytes
) -> None:
    """Write the key encrypted, or for a token key only its label (``.p11``), never both."""
    if token_label is None:
        if not passphrase:
            raise CAPassphraseError(
                "CA keys are encrypted at rest: set FLEETGATE_CA_PASSPHRASE or ca.passphrase_file"
            )
        write_private_key(key_path, key, passphrase)
        _token_reference(key_path).unlink(missing_ok=True)
    else:
        write_atomic(_token_reference(key_path), token_label.encode() + b"\n", mode=0o600)
        key_path.unlink(missing_ok=True)


def load_ca_key(config: Config, key_path: Path) -> ec.EllipticCurvePrivateKey:
    """The key stored at ``key_path``: decrypted with the passphrase, or opened in the token."""
    reference = _token_reference(key_path)
    if reference.exists():
        from enrollment import pkcs11

        label = reference.read_text().strip()
        return pkcs11.load_key(pkcs11.token_settings(config), label)
    return load_private_key(key_path, config.read_passphrase())


def copy_ca_key(source: Path, target: Path) -> None:
    """Copy a stored key (the encrypted file, or the token reference) to another name."""
    for src, dst in ((source, target), (_token_reference(source), _token_reference(target))):
        if src.exists():
            write_atomic(dst, src.read_bytes(), mode=0o600)


def init_ca(config: Config, *, curve: str | None = None, force: bool = False) -> TrustAnchors:
    """Create the root and issuing CA and the enrollment server's certificate."""
    paths = ca_paths(config)
    if has_key(paths.issuing_key) and not force:
        raise ConfigError(
            f"a CA already exists in {paths.directory}; pass --force to replace it "
            "(every certificate it issued stops verifying)"
        )
    passphrase = config.read_passphrase() or b""
    in_token = config.ca.key_store == "pkcs11" and config.ca.pkcs11_root_key_label
    if not in_token and len(passphrase) < 8:
        raise CAPassphraseError(
            "CA keys are encrypted at rest: set FLEETGATE_CA_PASSPHRASE (8+ characters) "
            "or ca.passphrase_file before `fleetgate ca init`"
        )
    curve_name = curve or config.ca.root_curve
    if curve_name not in profiles.CURVES:
        raise ConfigError(f"root curve {curve_name!r} is not supported; use P-256 or P-384")
    now = dt.datetime.now(dt.UTC)
    root_key, root_label = new_ca_key(
        config, curve=curve_name, token_label=config.ca.pkcs11_root_key_label
    )
    root = profiles.build_certificate(
        profiles.ROOT,
        subject=Subject(common_name="fleetgate root CA"),
        public_key=root_key.public_key(),
        issuer=Issuer(key=root_key, certificate=None),
        validity=ROOT_VALIDITY,
        now=now,
    )
    issuing_key, issuing_label = new_ca_key(
        config, curve="P-256", token_label=config.ca.pkcs11_key_label
    )
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
    store_ca_key(paths.root_key, root_key, root_label, passphrase)
    store_ca_key(paths.issuing_key, issuing_key, issuing_label, passphrase)
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
    """Unlock the current issuing CA (the passphrase, or the token's PIN)."""
    anchors = load_anchors(config)
    key = load_ca_key(config, ca_paths(config).issuing_key)
    return CertificateAuthority(config, anchors, key, presented=_presented(config, anchors))


def _presented(config: Config, anchors: TrustAnchors) -> tuple[x509.Certificate, ...]:
    """The issuing CA, and during a root rotation the current root as certified by the old
    one (in ``chain.pem`` until the old root is retired)."""
    chain = ca_paths(config).chain
    trusted = load_certificates(chain) if chain.exists() else []
    root = anchors.root
    crosses = [c for c in trusted if c.public_key() == root.public_key() and c != root]
    return (anchors.issuing, *crosses)


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
    write_certificates(credentials.cert, [cert, *authority.presented])
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
