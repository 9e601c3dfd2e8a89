"""CA keys in a PKCS#11 token (an HSM, or SoftHSM2 in tests and the demo).

The key pair is generated inside the token, private half sensitive and never extractable; the
CA process logs in with the user PIN and asks the token for ECDSA signatures over digests it
computes itself (SoftHSM2 offers plain ``CKM_ECDSA`` only, every token offers that). The PIN is
read from ``FLEETGATE_PKCS11_PIN`` or ``ca.pkcs11_pin_file``, never from the command line (where
``ps`` and shell history would show it) or the TOML file.

python-pkcs11 is imported only here, and only when ``ca.key_store = "pkcs11"``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from enrollment.signing import ExternalKey
from fleetgate.config import Config
from fleetgate.errors import ConfigError

PIN_ENV = "FLEETGATE_PKCS11_PIN"
_CURVE_NAMES = {"P-256": "secp256r1", "P-384": "secp384r1"}


@dataclass(frozen=True)
class TokenSettings:
    """Where the token is and how to log in to it."""

    module: Path
    token_label: str
    pin: str


def token_settings(config: Config) -> TokenSettings:
    """The configured token; :class:`ConfigError` names what is missing."""
    settings = config.ca
    if not settings.pkcs11_module or not settings.pkcs11_token_label:
        raise ConfigError(
            'ca.key_store = "pkcs11" needs ca.pkcs11_module (the token\'s PKCS#11 library) '
            "and ca.pkcs11_token_label"
        )
    return TokenSettings(Path(settings.pkcs11_module), settings.pkcs11_token_label, _pin(config))


def _pin(config: Config) -> str:
    value = os.environ.get(PIN_ENV)
    if value:
        return value
    if config.ca.pkcs11_pin_file:
        path = config.data_path(config.ca.pkcs11_pin_file)
        try:
            pin = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the PKCS#11 PIN file {path}: {exc.strerror}") from exc
        if pin:
            return pin
    raise ConfigError(
        f"the CA key is in a PKCS#11 token: set {PIN_ENV} or ca.pkcs11_pin_file "
        "(never on the command line)"
    )


class TokenKey(ExternalKey):
    """One EC private key in the token, found by its label.

    A PKCS#11 session runs one operation at a time, and the enrollment service signs from
    several threads: the token's lock serialises them (a signature takes ~0.07 ms in SoftHSM2).
    """

    def __init__(
        self, private: Any, public: ec.EllipticCurvePublicKey, lock: threading.Lock
    ) -> None:
        self._private = private
        self._public = public
        self._lock = lock

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        from pkcs11 import Mechanism

        with self._lock:
            raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )


# PKCS#11 logs an application in once per token: every key of a token shares one read-write
# session, opened at first use and kept for the life of the process, and its lock.
_SESSIONS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(settings: TokenSettings) -> tuple[Any, threading.Lock]:
    key = (str(settings.module), settings.token_label)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = (_open_session(settings), threading.Lock())
        return _SESSIONS[key]


def _open_session(settings: TokenSettings) -> Any:
    import pkcs11
    from pkcs11.exceptions import NoSuchToken, PinIncorrect, PKCS11Error

    try:
        library = pkcs11.lib(str(settings.module))
    except (RuntimeError, OSError, PKCS11Error) as exc:
        raise ConfigError(f"cannot load the PKCS#11 module {settings.module}: {exc}") from exc
    try:
        token = library.get_token(token_label=settings.token_label)
    except NoSuchToken:
        raise ConfigError(
            f"no PKCS#11 token labelled {settings.token_label!r} in {settings.module}"
        ) from None
    try:
        return token.open(user_pin=settings.pin, rw=True)
    except PinIncorrect:
        raise ConfigError(f"the PIN for PKCS#11 token {settings.token_label!r} is wrong") from None


def load_key(settings: TokenSettings, label: str) -> TokenKey:
    """The token's private key labelled ``label`` (and its public key), logged in."""
    from pkcs11 import KeyType, ObjectClass
    from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey

    session, lock = _session(settings)
    try:
        with lock:
            private = session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=label
            )
            public = session.get_key(
                object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=label
            )
    except NoSuchKey:
        raise ConfigError(
            f"PKCS#11 token {settings.token_label!r} holds no EC key pair labelled {label!r}"
        ) from None
    except MultipleObjectsReturned:
        raise ConfigError(
            f"PKCS#11 token {settings.token_label!r} holds several keys labelled {label!r}"
        ) from None
    return TokenKey(private, _public_key(public), lock)


def generate_key(settings: TokenSettings, label: str, curve: str = "P-256") -> TokenKey:
    """A new key pair in the token under ``label``; refuses a label already in use."""
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    session, lock = _session(settings)
    with lock:
        taken = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
        if list(session.get_objects(taken)):
            raise ConfigError(
                f"PKCS#11 token {settings.token_label!r} already holds a key labelled {label!r}"
            )
        parameters = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_NAMES[curve])},
            local=True,
        )
        parameters.generate_keypair(
            store=True,
            label=label,
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            },
        )
    return load_key(settings, label)


def _public_key(public: Any) -> ec.EllipticCurvePublicKey:
    from pkcs11.util.ec import encode_ec_public_key

    key = serialization.load_der_public_key(encode_ec_public_key(public))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError("the PKCS#11 key is not an EC key")
    return key


SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")  # Debian's softhsm2


def softhsm_token(directory: Path, label: str, pin: str) -> TokenSettings:
    """A fresh SoftHSM2 token in ``directory`` (for the tests, the benchmark and the demo): its
    configuration file goes into ``SOFTHSM2_CONF`` of this process and its children. The PIN
    passes on softhsm2-util's command line: acceptable for a throw-away token only."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    command = ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin]
    so_pin = ["--so-pin", secrets.token_hex(8)]
    subprocess.run([*command, *so_pin], check=True, capture_output=True)  # noqa: S603 (ours)
    return TokenSettings(SOFTHSM_MODULE, label, pin)
