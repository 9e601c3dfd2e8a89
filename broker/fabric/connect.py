"""How a node proves itself to the fabric: TLS 1.3 with its client certificate, and its NATS
user (issue 12, "no way around the gate").

The cluster is meant to refuse anonymous clients and to hold fleetgate's nodes in a user whose
permissions only they have (docs/operations.md, "NATS accounts and permissions"), so these
settings are what keeps other NATS clients out of device subjects. Secrets come from files
that only their owner may read, never from the command line or the environment, and no
option built here is ever logged.

Three logins: a user and password; a NATS credentials file (``.creds``, as ``nsc generate
creds`` writes it: the user's JWT, signed by its account, and the user's nkey seed, which signs
the server's nonce); or a bare user nkey seed. nats-py reads the file again at each reconnect,
so credentials can be replaced in place. The file is checked here first, because nats-py
would loop forever on a file without a JWT line, and the server only ever says "Authorization
Violation": a seed that is not the JWT's user, an expired JWT or an account JWT get a reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import ssl
import stat
import time
from pathlib import Path
from typing import Any

from fleetgate.config import Config
from fleetgate.errors import ConfigError


def read_owner_only(path: Path, what: str) -> bytes:
    """A secret file's bytes; refused if missing or readable by group or others (0600)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"[fabric] {what} {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"[fabric] {what} {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
            f"chmod 600 {path}"
        )
    return path.read_bytes()


def tls_context(config: Config) -> ssl.SSLContext:
    """TLS 1.3 only, the fabric CA as the trust anchor, this node's client certificate."""
    settings = config.fabric
    assert settings is not None
    path = config.data_path
    cafile = str(path(settings.tls_ca_file)) if settings.tls_ca_file else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except OSError as exc:
        raise ConfigError(f"[fabric] tls_ca_file {cafile}: {exc.strerror or exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if settings.tls_cert_file:
        key = path(settings.tls_key_file)
        read_owner_only(key, "tls_key_file")
        try:
            context.load_cert_chain(path(settings.tls_cert_file), key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"[fabric] tls_cert_file/tls_key_file {path(settings.tls_cert_file)}: {exc}"
            ) from exc
    return context


def auth_options(config: Config) -> dict[str, Any]:
    """The nats-py ``connect`` options for TLS and credentials, from ``[fabric]``."""
    settings = config.fabric
    assert settings is not None
    options: dict[str, Any] = {}
    wants_tls = any(url.startswith("tls://") for url in settings.servers)
    if wants_tls or settings.tls_ca_file or settings.tls_cert_file:
        options["tls"] = tls_context(config)
    if settings.user:
        secret = read_owner_only(config.data_path(settings.password_file), "password_file")
        password = secret.decode("utf-8", "replace").strip()
        if not password:
            raise ConfigError(f"[fabric] password_file {settings.password_file} is empty")
        options["user"] = settings.user
        options["password"] = password
    if settings.credentials_file:
        creds = config.data_path(settings.credentials_file)
        check_credentials(creds, read_owner_only(creds, "credentials_file"))
        options["user_credentials"] = str(creds)
    if settings.nkey_seed_file:
        seed_file = config.data_path(settings.nkey_seed_file)
        seed = read_owner_only(seed_file, "nkey_seed_file").strip()
        _user_of_seed(seed, f"[fabric] nkey_seed_file {seed_file}")
        options["nkeys_seed"] = str(seed_file)
    return options


_JWT_LINES = re.compile(rb"-----BEGIN NATS USER JWT-----\n([A-Za-z0-9_.-]+)\n")
_SEED_LINES = re.compile(rb"-----BEGIN USER NKEY SEED-----\n([A-Z2-7]+)\n")


def check_credentials(path: Path, text: bytes) -> None:
    """Refuse a ``.creds`` file nats-py could not use, or the servers would refuse, saying why
    (never quoting the seed): each part on its own line after its BEGIN line, a user JWT that
    has not expired, and the seed of that very user."""
    where = f"[fabric] credentials_file {path}"
    jwt, seed = _JWT_LINES.search(text), _SEED_LINES.search(text)
    if jwt is None or seed is None:
        missing = "user JWT" if jwt is None else "user nkey seed"
        raise ConfigError(
            f"{where} is not a NATS credentials file: no {missing} on its own line after its "
            "BEGIN line (make one with `nsc generate creds`)"
        )
    claims = _jwt_claims(jwt.group(1), where)
    nats = claims.get("nats")
    kind = nats.get("type") if isinstance(nats, dict) else None
    if kind != "user":
        raise ConfigError(f"{where}: its JWT is a {kind or 'untyped'} JWT, not a user's")
    expires = claims.get("exp")
    if isinstance(expires, int) and expires <= time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise ConfigError(f"{where}: its user JWT expired at {when}: issue new credentials")
    user = _user_of_seed(seed.group(1), where)
    if user != claims.get("sub"):
        raise ConfigError(
            f"{where}: its nkey seed is of user {user}, its JWT is of user {claims.get('sub')}"
        )


def _jwt_claims(token: bytes, where: str) -> dict[str, Any]:
    """The claims (middle part) of a JWT, unverified: the servers check its signature."""
    parts = token.split(b".")
    try:
        if len(parts) != 3:
            raise ValueError("not three parts")
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"{where}: its JWT does not decode ({exc})") from exc
    if not isinstance(claims, dict):
        raise ConfigError(f"{where}: its JWT holds no claims")
    return claims


def _user_of_seed(seed: bytes, where: str) -> str:
    """The public key (``U…``) of a user nkey seed (``SU…``); a reason without the seed."""
    try:
        import nkeys  # nats-py's nkeys extra, on PyNaCl
    except ImportError as exc:  # an installation without the lock's dependencies
        raise ConfigError(
            f"{where} needs the nkeys package (pip install 'nats-py[nkeys]')"
        ) from exc
    if not seed.startswith(b"SU"):
        raise ConfigError(f"{where}: not a user nkey seed (a user's starts with SU)")
    try:
        pair = nkeys.from_seed(bytearray(seed))
    except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"{where}: the nkey seed does not decode ({type(exc).__name__})") from exc
    user: str = pair.public_key.decode()
    pair.wipe()
    return user
