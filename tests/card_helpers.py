"""Shared parts of the smartcard tests: a private pcscd, a card maker, fresh virtual cards.

One pcscd (with vpcd) serves the whole session in its own namespaces; libpcsclite reads the
socket path from ``PCSCLITE_CSOCK_NAME`` once per process, so the variable is set before any
PC/SC call. Each test gets a newly manufactured card inserted into the reader, and removed
(its applet stopped by PID) at the end. Test modules import the fixtures they use.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Fleet
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk.piv import CardAbsent, PivCard
from firmware_sim.vcard import CardManufacturer, PcscDaemon, VirtualCard

PIN = "123456"
_serials = itertools.count(5000)


_daemons: list[PcscDaemon] = []


@pytest.fixture(scope="session", name="pcsc")
def pcsc_fixture(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> PcscDaemon:
    """The session's pcscd. Each test module imports this fixture, which pytest then registers
    once per module; all of them share one daemon, stopped when the session ends."""
    if not _daemons:
        daemon = PcscDaemon(tmp_path_factory.mktemp("pcscd")).start()
        patch = pytest.MonkeyPatch()
        for key, value in daemon.env().items():
            patch.setenv(key, value)
        request.config.add_cleanup(daemon.stop)
        request.config.add_cleanup(patch.undo)
        request.config.add_cleanup(_daemons.clear)
        _daemons.append(daemon)
    return _daemons[0]


@pytest.fixture(scope="session", name="card_maker")
def card_maker_fixture(tmp_path_factory: pytest.TempPathFactory) -> CardManufacturer:
    return CardManufacturer.create(tmp_path_factory.mktemp("card-maker"))


@dataclass
class CardHandle:
    """A virtual card in the reader, and its maker."""

    virtual: VirtualCard
    maker: CardManufacturer
    serial: int

    def open(self, timeout: float = 10.0) -> PivCard:
        """A PC/SC connection once pcscd has noticed the card (it polls the reader)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return PivCard.open()
            except CardAbsent:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def reinsert(self) -> None:
        self.virtual.remove()
        wait_card_gone()
        self.virtual.insert()
        self.open().close()


def wait_card_gone(timeout: float = 10.0) -> None:
    """Until pcscd reports the reader empty, so the next insertion is a new card session."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            PivCard.open().close()
        except CardAbsent:
            return
        time.sleep(0.05)
    raise AssertionError("pcscd still reports a card after it was removed")


@pytest.fixture(name="card")
def card_fixture(
    pcsc: PcscDaemon, card_maker: CardManufacturer, tmp_path: Path
) -> Iterator[CardHandle]:
    serial = next(_serials)
    state = card_maker.manufacture(tmp_path / f"card-{serial}.json", serial=serial, pin=PIN)
    handle = CardHandle(VirtualCard(pcsc, state).insert(), card_maker, serial)
    handle.open().close()  # present to PC/SC before the test starts
    yield handle
    handle.virtual.remove()
    wait_card_gone()


def trust_card_maker(fleet: Fleet, maker: CardManufacturer) -> Path:
    """Put ``maker``'s CA into the service's card-manufacturer trust store."""
    store = fleet.config.data_path(fleet.config.attestation.card_manufacturer_cas)
    store.mkdir(parents=True, exist_ok=True)
    path = store / f"{maker.directory.name}.pem"
    path.write_bytes(maker.cert_path.read_bytes())
    return path


def opensc_tool(*args: str) -> str:
    """Run an OpenSC command-line tool against the private pcscd; its stdout."""
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False
    )
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr}{result.stdout}"
    return result.stdout


# -- attestation evidence made in software, for the pure verifier tests --------------------------


@dataclass(frozen=True)
class SoftwareCard:
    """What a card would show: a maker CA, the card's F9 certificate and key."""

    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    f9: x509.Certificate
    f9_key: ec.EllipticCurvePrivateKey

    def attest(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        return make_cert(
            cn_name("attestation 9a"),
            self.f9.subject,
            public_key,
            signer or self.f9_key,
            ca=False,
        )


def software_card(maker_name: str = "software maker") -> SoftwareCard:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert(cn_name(maker_name), cn_name(maker_name), ca_key.public_key(), ca_key, ca=True)
    f9_key = ec.generate_private_key(ec.SECP256R1())
    f9 = make_cert(cn_name("card F9"), ca.subject, f9_key.public_key(), ca_key, ca=True)
    return SoftwareCard(ca, ca_key, f9, f9_key)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cn_name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    days: int = 365,
    start: dt.datetime | None = None,
) -> x509.Certificate:
    now = start or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
