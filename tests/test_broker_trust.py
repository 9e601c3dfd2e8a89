"""The broker's client-certificate trust anchors: every CA in ``ca/chain.pem``, checked once.

The broker verifies device chains only up to the issuing CA (OpenSSL's partial-chain flag), so
what may stand in ``ca/chain.pem`` is checked when the broker builds its TLS context.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker.tls import broker_context, check_fleet_chain
from enrollment import profiles
from enrollment.ca import ca_paths
from fleetgate.errors import ConfigError
from fleetgate.keyfiles import load_certificates, write_certificates

NOW = dt.datetime.now(dt.UTC)
SOURCE = Path("chain.pem")


def ca(
    name: str,
    *,
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    now: dt.datetime = NOW,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A root (``signer`` None) or an issuing CA signed by ``signer`` = (key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = (
        profiles.Issuer(key=key, certificate=None)
        if signer is None
        else profiles.Issuer(key=signer[0], certificate=signer[1])
    )
    cert = profiles.build_certificate(
        profiles.ROOT if signer is None else profiles.ISSUING,
        subject=profiles.Subject(common_name=name),
        public_key=key.public_key(),
        issuer=issuer,
        validity=dt.timedelta(days=days),
        now=now,
    )
    return key, cert


def test_the_fleets_own_chain_passes(fleet):
    check_fleet_chain(load_certificates(ca_paths(fleet.config).chain), now=NOW, source=SOURCE)


def test_an_issuing_ca_the_root_did_not_sign_is_refused():
    root = ca("fleet root")
    stranger = ca("stranger root")
    issuing = ca("fleet issuing", signer=stranger)
    with pytest.raises(ConfigError, match="is not signed by the root CA in that file"):
        check_fleet_chain([issuing[1], root[1]], now=NOW, source=SOURCE)


def test_an_expired_ca_is_refused():
    root = ca("fleet root")
    issuing = ca("fleet issuing", signer=root, now=NOW - dt.timedelta(days=40), days=30)
    with pytest.raises(ConfigError, match="is not valid now"):
        check_fleet_chain([issuing[1], root[1]], now=NOW, source=SOURCE)


def test_a_file_without_a_root_is_refused():
    root = ca("fleet root")
    issuing = ca("fleet issuing", signer=root)
    with pytest.raises(ConfigError, match="holds no self-signed root CA"):
        check_fleet_chain([issuing[1]], now=NOW, source=SOURCE)


def test_the_broker_will_not_start_on_a_tampered_chain(fleet):
    """An issuing CA from elsewhere slipped into ca/chain.pem would become a trust anchor."""
    paths = ca_paths(fleet.config)
    root = load_certificates(paths.root_cert)[0]
    foreign = ca("fleet issuing", signer=ca("stranger root"))
    write_certificates(paths.chain, [foreign[1], root])
    with pytest.raises(ConfigError, match="not signed by the root CA"):
        broker_context(fleet.config, paths.server_cert, paths.server_key)
