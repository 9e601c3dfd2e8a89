"""FileKeyStore: the key never readable by others, key and certificate always a pair on disk."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sdk import FileKeyStore, KeyStoreError, device_context, device_csr, device_id_of
from device_sdk.keystore import KeyStore


def issue(device_id: str, key: ec.EllipticCurvePrivateKey) -> list[x509.Certificate]:
    """A device certificate and its (self-signed) issuer, like the fleet CA's, for ``key``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuing CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:fleetgate:device:{device_id}")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return [leaf, ca]


def test_file_key_store_is_a_key_store(tmp_path: Path) -> None:
    store: KeyStore = FileKeyStore(tmp_path / "device")
    assert store.certificate_path.name == "device.crt"
    assert store.trust_anchors_path.name == "ca.crt"


def test_new_key_is_p256_and_signs_a_csr_with_cryptographys_builder(tmp_path: Path) -> None:
    key = FileKeyStore(tmp_path / "device").new_key()
    assert isinstance(key.curve, ec.SECP256R1)
    csr = device_csr("sensor-1", key)
    assert csr.is_signature_valid


def test_install_writes_a_0600_key_and_the_chain_and_loads_into_ssl(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "device")
    assert (store.directory.stat().st_mode & 0o777) == 0o700
    key = store.new_key()
    chain = issue("sensor-1", key)
    store.install(key, chain)
    assert (store.key_path.stat().st_mode & 0o777) == 0o600
    assert store.certificates() == chain
    assert device_id_of(store.certificates()[0]) == "sensor-1"
    store.load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # key and certificate match
    assert sorted(p.name for p in store.directory.iterdir()) == ["device.crt", "device.key"]


def test_a_second_install_replaces_key_and_certificate_together(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "device")
    first = store.new_key()
    store.install(first, issue("sensor-1", first))
    second = store.new_key()
    chain = issue("sensor-1", second)
    store.install(second, chain)
    assert store.certificates()[0] == chain[0]
    assert store.key_path.read_bytes() != b""
    store.load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    assert (store.key_path.stat().st_mode & 0o777) == 0o600


def test_install_refuses_a_certificate_for_another_key_and_changes_nothing(
    tmp_path: Path,
) -> None:
    store = FileKeyStore(tmp_path / "device")
    key = store.new_key()
    store.install(key, issue("sensor-1", key))
    before = store.key_path.read_bytes(), store.certificate_path.read_bytes()
    stranger = issue("sensor-1", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(KeyStoreError, match="is not for the key being installed"):
        store.install(store.new_key(), stranger)
    assert (store.key_path.read_bytes(), store.certificate_path.read_bytes()) == before


def test_an_install_interrupted_after_its_commit_record_is_finished_on_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileKeyStore(tmp_path / "device")
    old = store.new_key()
    store.install(old, issue("sensor-1", old))
    new = store.new_key()
    chain = issue("sensor-1", new)
    monkeypatch.setattr(FileKeyStore, "_recover", lambda self: None)  # "crash" before renames
    store.install(new, chain)
    monkeypatch.undo()
    assert {p.name for p in store.directory.glob("*.new")} == {"device.key.new", "device.crt.new"}

    reopened = FileKeyStore(store.directory)
    assert reopened.certificates() == chain
    reopened.load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # the new pair
    assert not list(store.directory.glob("*.new"))
    assert (reopened.key_path.stat().st_mode & 0o777) == 0o600


def test_a_staged_key_without_its_certificate_is_forgotten_on_open(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "device")
    key = store.new_key()
    chain = issue("sensor-1", key)
    store.install(key, chain)
    (store.directory / "device.key.new").write_bytes(b"half a renewal")
    reopened = FileKeyStore(store.directory)
    assert not (store.directory / "device.key.new").exists()
    assert reopened.certificates() == chain


def test_an_empty_store_says_to_enroll_and_where_to_put_the_fleet_ca(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "device")
    with pytest.raises(KeyStoreError, match="enroll the device first"):
        store.certificates()
    with pytest.raises(KeyStoreError, match="enroll the device first"):
        store.load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    with pytest.raises(KeyStoreError, match=r"no trust anchors at .*ca\.crt: provision"):
        device_context(store)


def test_a_certificate_without_a_device_uri_is_not_a_device_certificate(tmp_path: Path) -> None:
    leaf, ca = issue("sensor-1", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(KeyStoreError, match="not a fleetgate device certificate"):
        device_id_of(ca)
    assert device_id_of(leaf) == "sensor-1"
