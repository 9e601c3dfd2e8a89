"""How a node proves itself to the fabric: TLS 1.3 with its client certificate, and its NATS
user (issue 12, "no way around the gate").

The cluster is meant to refuse anonymous clients and to hold fleetgate's nodes in a user whose
permissions only they have (docs/operations.md, "NATS accounts and permissions"), so these
settings are what keeps other NATS clients out of device subjects. Secrets come from files
that only their owner may read, never from the command line or the environment, and no
option built here is ever logged.
"""

from __future__ import annotations

import importlib.util
import ssl
import stat
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
        read_owner_only(creds, "credentials_file")
        if importlib.util.find_spec("nkeys") is None:  # nats-py signs with it
            raise ConfigError(
                "[fabric] credentials_file needs the nkeys package, which fleetgate does not "
                "install: use user and password_file"
            )
        options["user_credentials"] = str(creds)
    return options
