"""The identity step refuses every certificate shape the fleet CA never issues (issue 11).

A device certificate is an end-entity signing key for clientAuth naming exactly one device. A CA
certificate, a certificate without the digitalSignature key usage, and one naming the same device
twice, two devices, or a device and a station are refused before the registry is asked, with the
reason audited.
"""

from __future__ import annotations

import datetime as dt

import pytest
from broker_helpers import V5, Paho, craft, running_broker, wait_for  # noqa: F401
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enrollment import profiles
from enrollment.errors import NotAuthorised
from enrollment.identity import named_identity
from enrollment.ids import SubjectKind

DEVICE = "urn:fleetgate:device:"
STATION = "urn:fleetgate:station:"
NOW = dt.datetime.now(dt.UTC)


def certificate(
    *,
    uris: tuple[str, ...] = (f"{DEVICE}d1",),
    ca: bool | None = False,
    usage: bool | None = True,
    client_auth: bool = True,
) -> x509.Certificate:
    """A self-signed certificate of the given shape: the identity step reads only its fields."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if usage is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=usage,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not usage,
                key_cert_sign=bool(ca),
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if client_auth:
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(eku, critical=False)
    return builder.sign(key, hashes.SHA256())


def test_a_device_certificate_names_its_one_device():
    peer = named_identity(certificate())
    assert (peer.kind, peer.id) == (SubjectKind.DEVICE, "d1")
    station = named_identity(certificate(uris=(f"{STATION}line-1", "https://example.test/x")))
    assert (station.kind, station.id) == (SubjectKind.STATION, "line-1")


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ({"ca": True}, "is a CA certificate (CA:TRUE)"),
        ({"usage": False}, "lacks the digitalSignature key usage"),
        ({"usage": None}, "lacks the digitalSignature key usage"),
        ({"client_auth": False}, "lacks the clientAuth extended key usage"),
        ({"uris": (f"{DEVICE}d1", f"{DEVICE}d1")}, "names 2 fleetgate identities"),
        ({"uris": (f"{DEVICE}d1", f"{DEVICE}d2")}, "names 2 fleetgate identities"),
        ({"uris": (f"{DEVICE}d1", f"{STATION}s1")}, "(device:d1, station:s1)"),
        ({"uris": ("https://example.test/d1",)}, "names no fleetgate device or station"),
        ({"uris": ()}, "names no fleetgate device or station"),
    ],
)
def test_a_certificate_of_any_other_shape_is_refused_with_its_reason(shape, reason):
    with pytest.raises(NotAuthorised) as refused:
        named_identity(certificate(**shape))
    assert reason in refused.value.message


CLIENT_CA = profiles.Profile(
    "ca-as-client",
    is_ca=True,
    key_cert_sign=True,
    digital_signature=True,
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)


@pytest.mark.parametrize(
    ("profile", "uris", "reason"),
    [
        (CLIENT_CA, (f"{DEVICE}ca-1",), "is a CA certificate (CA:TRUE)"),
        (profiles.DEVICE, (f"{DEVICE}twice", f"{DEVICE}twice"), "names 2 fleetgate identities"),
        (profiles.DEVICE, (f"{DEVICE}mixed", f"{STATION}line-1"), "(device:mixed, station:line-1)"),
    ],
    ids=["ca-true", "same-device-twice", "device-and-station"],
)
def test_the_broker_refuses_such_a_certificate_and_audits_why(fleet, broker, profile, uris, reason):
    """Signed by the fleet's own issuing CA, so only the identity step stands in the way."""
    creds = craft(fleet, "odd", profile, uris=uris)
    client = Paho(broker, creds, version=V5)
    try:
        code, _, _ = client.connect()
    finally:
        client.close()
    assert code == 135  # Not authorized
    events = wait_for(
        lambda: [
            e
            for e in broker.audit_events(None, action="mqtt.connect", outcome="refused")
            if reason in e.reason
        ],
        what=f"an mqtt.connect refusal audited with {reason!r}",
    )
    assert len(events) == 1
