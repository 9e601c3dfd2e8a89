"""Private keys and certificates on disk: keys 0600, CA keys encrypted (PKCS#8, AES-256-CBC).

PKCS#8 encryption from ``cryptography`` derives its key with PBKDF2 at only 2,048 iterations,
cheap to brute-force offline. So the passphrase is first stretched with scrypt (N=2^15, r=8,
p=1, about 0.1 s and 32 MiB per guess) and the result is the PKCS#8 password. The scrypt
parameters and salt sit in a ``Fleetgate-KDF:`` line before the PEM block, which PEM readers
ignore; ``openssl pkcs8`` can still decrypt the key given the stretched password.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetgate.errors import CAPassphraseError, ConfigError

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_KDF_LINE = re.compile(rb"^Fleetgate-KDF: scrypt n=(\d+) r=(\d+) p=(\d+) salt=([0-9a-f]{32})\n")


def _stretch(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    derived = hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024)
    return derived.hex().encode()


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None
) -> None:
    """Write ``key`` as PKCS#8 PEM, created 0600 so it is never readable by others, even briefly."""
    header = b""
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if passphrase:
        salt = os.urandom(16)
        header = (
            f"Fleetgate-KDF: scrypt n={_SCRYPT_N} r={_SCRYPT_R} p={_SCRYPT_P} "
            f"salt={salt.hex()}\n".encode()
        )
        stretched = _stretch(passphrase, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
        encryption = serialization.BestAvailableEncryption(stretched)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_secret(path, header + pem)


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only."""
    write_atomic(path, data, mode=0o600)


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` in one step, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an EC key; a wrong or missing passphrase raises :class:`CAPassphraseError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"key file {path} does not exist") from exc
    kdf = _KDF_LINE.match(data)
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and not passphrase:
        raise CAPassphraseError(
            f"{path} is encrypted: set FLEETGATE_CA_PASSPHRASE or ca.passphrase_file"
        )
    password = passphrase if encrypted else None
    if password and kdf:
        n, r, p = (int(v) for v in kdf.group(1, 2, 3))
        password = _stretch(password, bytes.fromhex(kdf.group(4).decode()), n, r, p)
    try:
        key = serialization.load_pem_private_key(data[kdf.end() if kdf else 0 :], password=password)
    except ValueError as exc:
        if encrypted:
            raise CAPassphraseError(
                f"the CA passphrase does not decrypt {path}: check FLEETGATE_CA_PASSPHRASE "
                "or ca.passphrase_file"
            ) from exc
        raise ConfigError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; fleetgate keys are ECDSA")
    return key


def write_certificates(path: Path, certs: list[x509.Certificate]) -> None:
    """Replace a PEM bundle atomically: a running server renews its certificate in place."""
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    write_atomic(path, pem, mode=0o644)


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate file {path} does not exist") from exc
