"""NATS decentralised auth for the tests: an operator, its accounts and their users, minted
here with the nkeys package the way nsc would, and the server configuration that trusts them.

A NATS JWT (schema v2) is ``base64url(header).base64url(claims).base64url(signature)``, all
unpadded; the header is ``{"typ":"JWT","alg":"ed25519-nkey"}``; the signature is the issuer
nkey's ed25519 signature of the first two parts; ``jti`` is the unpadded base32 SHA-512/256 of
the standard claims (``aud exp iat iss name nbf sub``, empty ones left out) before it is set.
An operator signs itself and its accounts, an account its users; ``nats.type`` names which.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys

UNLIMITED = -1
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def new_key(prefix: int) -> Any:
    """A fresh nkey pair of the kind ``prefix`` says (nkeys.PREFIX_BYTE_OPERATOR/ACCOUNT/USER)."""
    raw = bytes(nacl.signing.SigningKey.generate())
    return nkeys.from_seed(bytearray(nkeys.encode_seed(raw, prefix)))


def public(key: Any) -> str:
    return str(key.public_key.decode())


def seed(key: Any) -> str:
    return str(bytes(key.seed).decode())


def encode(issuer: Any, subject: str, name: str, nats: dict[str, Any], **standard: Any) -> str:
    """A JWT of ``nats`` claims about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {
        "iat": standard.pop("iat", int(time.time())),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        **standard,
    }
    ordered = {
        k: claims[k] for k in ("aud", "exp", "iat", "iss", "name", "nbf", "sub") if k in claims
    }
    digest = hashlib.new("sha512_256", json.dumps(ordered, separators=(",", ":")).encode())
    claims["jti"] = base64.b32encode(digest.digest()).decode().rstrip("=")
    claims["nats"] = {**nats, "version": 2}
    signed = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def claims_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return result


@dataclass
class Account:
    """An account of the operator: its key, its users' keys, the users it revoked."""

    name: str
    key: Any = field(default_factory=lambda: new_key(nkeys.PREFIX_BYTE_ACCOUNT))
    jetstream: bool = True
    revocations: dict[str, int] = field(default_factory=dict)

    @property
    def public(self) -> str:
        return public(self.key)

    def user(self, name: str, *, expires: int | None = None, key: Any = None) -> tuple[str, Any]:
        """(JWT, key pair) of a new user of this account, allowed everything."""
        key = key or new_key(nkeys.PREFIX_BYTE_USER)
        nats = {
            "pub": {},
            "sub": {},
            "subs": UNLIMITED,
            "data": UNLIMITED,
            "payload": UNLIMITED,
            "type": "user",
        }
        extra = {"exp": expires} if expires is not None else {}
        return encode(self.key, public(key), name, nats, **extra), key

    def revoke(self, user_key: Any) -> None:
        """Every JWT of that user issued up to now is void (once the servers have this JWT)."""
        self.revocations[public(user_key)] = int(time.time()) + 1


@dataclass
class Operator:
    """The trust root: signs itself and its accounts; the servers trust only its JWT."""

    name: str = "FLEETGATE-TEST"
    key: Any = field(default_factory=lambda: new_key(nkeys.PREFIX_BYTE_OPERATOR))
    system: Account = field(default_factory=lambda: Account("SYS", jetstream=False))

    def jwt(self) -> str:
        nats = {"type": "operator", "system_account": self.system.public}
        return encode(self.key, public(self.key), self.name, nats)

    def account_jwt(self, account: Account) -> str:
        js = UNLIMITED if account.jetstream else 0
        limits = {
            "subs": UNLIMITED,
            "data": UNLIMITED,
            "payload": UNLIMITED,
            "imports": UNLIMITED,
            "exports": UNLIMITED,
            "wildcards": True,
            "conn": UNLIMITED,
            "leaf": UNLIMITED,
            "mem_storage": js,
            "disk_storage": js,
            "streams": js,
            "consumer": js,
        }
        nats: dict[str, Any] = {"limits": limits, "type": "account"}
        if account.revocations:
            nats["revocations"] = dict(account.revocations)
        return encode(self.key, account.public, account.name, nats)

    def server_block(self, directory: Path, accounts: list[Account]) -> str:
        """nats-server configuration trusting this operator, with ``accounts`` preloaded
        (the MEMORY resolver: no account server, the JWTs are in the configuration)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "operator.jwt"
        path.write_text(self.jwt())
        preload = "\n".join(
            f"  {account.public}: {self.account_jwt(account)}"
            for account in [self.system, *accounts]
        )
        return f"""
operator: "{path}"
system_account: {self.system.public}
resolver: MEMORY
resolver_preload: {{
{preload}
}}
"""


def write_creds(path: Path, jwt: str, key: Any, mode: int = 0o600) -> Path:
    """A ``.creds`` file as nsc writes it: the user JWT, then the user's nkey seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed(key)}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    os.chmod(path, mode)
    return path
