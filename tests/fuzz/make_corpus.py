"""Writes the seed corpus, tests/fuzz/corpus/<target>/<seed>: one valid example (or a near miss)
of each shape a target parses, for libFuzzer to mutate from.

Run it again after changing a target's input layout:
``.venv/bin/python tests/fuzz/make_corpus.py [target...]``.
Every seed is deterministic (fixed keys, RFC 6979 signatures, a fixed clock) except the RSA EK
certificate's key, so a regenerated corpus differs from the committed one only there.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from tpm2_pytss.types import TPM2B_PUBLIC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.mqtt import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    RetainHandling,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
)
from fuzz import pki, tpm_objects
from fuzz.targets import DEVICE_ID, join

CORPUS = Path(__file__).resolve().parent / "corpus"
_Q1, _Q2 = QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE


def _stream(level: int, packets: list[Packet]) -> bytes:
    return b"".join(encode(p, level) for p in packets)


def _client_session(level: int, *, will: bool, topic_alias: bool) -> list[Packet]:
    """What a device sends over one connection: the broker's side decodes all of it."""
    v5 = level == 5
    props = (
        Properties(session_expiry_interval=600, receive_maximum=2, maximum_packet_size=512)
        if v5
        else Properties()
    )
    last_will = (
        Will(
            topic="shared/will",
            payload=b"\x01gone",
            qos=_Q1,
            retain=True,
            properties=Properties(will_delay_interval=5, message_expiry_interval=60)
            if v5
            else Properties(),
        )
        if will
        else None
    )
    alias = (
        Properties(topic_alias=1, user_properties=(("k", "v"),)) if topic_alias else Properties()
    )
    subscription = Subscription(
        topic_filter="shared/#",
        qos=_Q2,
        no_local=v5,
        retain_handling=RetainHandling.SEND_IF_NEW_SUBSCRIPTION if v5 else 0,
    )
    return [
        Connect(
            client_id=DEVICE_ID,
            clean_start=not will,
            keep_alive=30,
            username="u",
            password=b"p",
            will=last_will,
            properties=props,
        ),
        Subscribe(packet_id=1, subscriptions=(subscription,)),
        Subscribe(
            packet_id=2, subscriptions=(Subscription(topic_filter=f"devices/{DEVICE_ID}/+"),)
        ),
        Publish(topic=f"devices/{DEVICE_ID}/t", payload=b"\x00zero"),
        Publish(topic="shared/a", payload=b"\x01one", qos=_Q1, packet_id=7, retain=True),
        Publish(topic="shared/b", payload=b"\x02two", qos=_Q2, packet_id=8, properties=alias),
        Publish(
            topic="" if topic_alias else "shared/b",
            payload=b"\x03three",
            qos=_Q1,
            packet_id=9,
            properties=Properties(topic_alias=1) if topic_alias else Properties(),
        ),
        PubRel(packet_id=8),
        PubAck(packet_id=1),
        PubRec(packet_id=2),
        PubComp(packet_id=2),
        PingReq(),
        Unsubscribe(packet_id=3, topic_filters=("shared/#",)),
        Disconnect(reason_code=ReasonCode.DISCONNECT_WITH_WILL_MESSAGE if v5 else 0),
    ]


def _server_packets(level: int) -> list[Packet]:
    """What a broker sends a client: for the decoder's client side."""
    if level == 4:
        return [
            ConnAck(session_present=True),
            Publish(topic="a/b", payload=b"x", qos=_Q1, packet_id=1),
            PubAck(packet_id=1),
            PubRec(packet_id=2),
            PubRel(packet_id=2),
            PubComp(packet_id=2),
            SubAck(
                packet_id=3, reason_codes=(ReasonCode.GRANTED_QOS_1, ReasonCode.UNSPECIFIED_ERROR)
            ),
            UnsubAck(packet_id=4),
            PingResp(),
        ]
    reason = Properties(reason_string="why", user_properties=(("a", "b"),))
    return [
        ConnAck(
            properties=Properties(
                receive_maximum=10,
                maximum_qos=1,
                retain_available=True,
                maximum_packet_size=1024,
                assigned_client_identifier="id",
                topic_alias_maximum=4,
                wildcard_subscription_available=False,
                subscription_identifier_available=True,
                shared_subscription_available=False,
                server_keep_alive=20,
                response_information="r",
                server_reference="s",
                authentication_method="m",
                authentication_data=b"d",
            )
        ),
        Publish(
            topic="a/b",
            payload=b"x",
            qos=_Q2,
            packet_id=5,
            properties=Properties(
                payload_format_indicator=1,
                message_expiry_interval=9,
                content_type="text/plain",
                response_topic="r/t",
                correlation_data=b"c",
                subscription_identifiers=(1, 300),
            ),
        ),
        PubAck(packet_id=1, reason_code=ReasonCode.NO_MATCHING_SUBSCRIBERS, properties=reason),
        PubRec(packet_id=2, reason_code=ReasonCode.QUOTA_EXCEEDED),
        PubRel(packet_id=2, reason_code=ReasonCode.PACKET_IDENTIFIER_NOT_FOUND),
        SubAck(packet_id=3, reason_codes=(ReasonCode.GRANTED_QOS_2, ReasonCode.NOT_AUTHORIZED)),
        UnsubAck(packet_id=4, reason_codes=(ReasonCode.NO_SUBSCRIPTION_EXISTED,)),
        Disconnect(reason_code=ReasonCode.SERVER_SHUTTING_DOWN, properties=reason),
        Auth(
            reason_code=ReasonCode.CONTINUE_AUTHENTICATION,
            properties=Properties(authentication_method="m"),
        ),
    ]


def codec_seeds() -> Iterator[tuple[str, bytes]]:
    # Byte 0: level in (mode % 3), piece size in bits 2-4 (see targets.fuzz_codec).
    for level, mode in ((5, 0), (4, 3 << 2)):
        for will in (False, True):
            packets = _client_session(level, will=will, topic_alias=level == 5)
            yield (
                f"server-v{level}-{'will' if will else 'plain'}",
                bytes([mode]) + _stream(level, packets),
            )
    yield "client-v3", bytes([1 | 1 << 2]) + _stream(4, _server_packets(4))
    yield "client-v5", bytes([2 | 5 << 2]) + _stream(5, _server_packets(5))
    yield "varint-length", b"\x02" + b"\x30\x82\x01" + b"\x00\x01t" + b"\x00" + b"p" * 126


def connection_seeds() -> Iterator[tuple[str, bytes]]:
    # Bytes 0-1: the harness's controls (see targets.fuzz_connection).
    for level in (5, 4):
        for will, alias in ((False, False), (True, level == 5)):
            stream = _stream(level, _client_session(level, will=will, topic_alias=alias))
            name = f"v{level}-{'will' if will else 'plain'}{'-alias' if alias else ''}"
            yield name, bytes([0x00, 0x00]) + stream
            yield f"{name}-gate-session", bytes([0x30 | 0x08, 0x05 | 0x20 | 0x08]) + stream
            yield f"{name}-refused-plaintext", bytes([0x04 | 0x02 | 0x80, 0x01 | 0x18]) + stream
            yield f"{name}-tight-limits", bytes([0x00, 0x40 | 0x03]) + stream
    unknown = encode(Connect(client_id=""), 5)
    yield "bad-level", b"\x00\x00" + unknown[:8] + b"\x07" + unknown[9:]
    yield "unidentified", b"\x03\x00" + unknown


def _csr(
    common_names: tuple[str, ...] = (DEVICE_ID,),
    extensions: tuple[x509.ExtensionType, ...] | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn) for cn in common_names])
    )
    if extensions is None:
        extensions = (
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:fleetgate:device:{DEVICE_ID}")]
            ),
        )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key or pki.key(pki.DEVICE), hashes.SHA256(), ecdsa_deterministic=True)


def csr_seeds() -> Iterator[tuple[str, bytes]]:
    # Byte 0 (mod 3): EST body, DER, or a CertificationRequestInfo the harness signs.
    device = _csr()
    der = device.public_bytes(Encoding.DER)
    yield "est-base64", b"\x00" + base64.encodebytes(der)
    yield "est-pem", b"\x00" + device.public_bytes(Encoding.PEM)
    yield "der", b"\x01" + der
    yield "info-device", b"\x02" + device.tbs_certrequest_bytes
    key_usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("example.com"), x509.UniformResourceIdentifier("urn:fleetgate:device:x")]
    )
    for name, csr in (
        ("info-extra-extension", _csr(extensions=(san, key_usage))),
        ("info-two-cns", _csr(common_names=(DEVICE_ID, "other"))),
        ("info-bad-id", _csr(common_names=("no/slashes",), extensions=())),
        ("info-foreign-san", _csr(extensions=(san,))),
        ("info-p384", _csr(key=ec.derive_private_key(7, ec.SECP384R1()))),
    ):
        yield name, b"\x02" + csr.tbs_certrequest_bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ek(label: str = pki.TPM_EK, issuer: str = pki.TPM_CA) -> x509.Certificate:
    return pki.certificate(label, issuer, ca=False)


def messages_seeds() -> Iterator[tuple[str, bytes]]:
    # Byte 0 (mod 3): TpmChallengeRequest, TpmEnrollRequest, PivEnrollRequest.
    ek = _b64(pki.der(_ek()))
    challenge = {
        "device_id": DEVICE_ID,
        "ek_certificate": ek,
        "ek_chain": [ek],
        "ak_public": _b64(tpm_objects.ak_public()),
    }
    enroll = {
        "challenge_id": "c-1",
        "activated_secret": _b64(b"s" * 32),
        "csr": _b64(_csr().public_bytes(Encoding.DER)),
        "key_public": _b64(tpm_objects.key_public()),
        "certify_info": "AAAA",
        "certify_signature": "AA==",
    }
    piv = {"csr": "AAAA", "attestation_certificate": ek, "attestation_intermediate": ek}
    for index, (name, payload) in enumerate(
        (("tpm-challenge", challenge), ("tpm-enroll", enroll), ("piv-enroll", piv))
    ):
        yield name, bytes([index]) + json.dumps(payload).encode()
    yield "nested", b"\x00" + b'{"device_id": [[{"a": 1.5e3, "b": null}]]}'
    # Byte 0 + 3: the fields from the input (one kind byte each: string, list, number, null).
    for index, payload in enumerate((challenge, enroll, piv)):
        values = [v if isinstance(v, str) else ",".join(v) for v in payload.values()]
        kinds = bytes(1 if isinstance(v, list) else 0 for v in payload.values())
        yield f"fields-{index}", bytes([index + 3]) + join(kinds, *(v.encode() for v in values))


def tpm_seeds() -> Iterator[tuple[str, bytes]]:
    # Byte 0 (mod 3): verify_certify, the same re-signed, make_challenge (see targets.fuzz_tpm).
    key_public = tpm_objects.key_public()
    area = TPM2B_PUBLIC.unmarshal(key_public)[0]
    info = tpm_objects.certify_info(area)
    signature = tpm_objects.ak_signature(info)
    ak = tpm_objects.ak_public()
    yield "certify", b"\x00" + join(ak, key_public, info, signature)
    yield "certify-resigned", b"\x01" + join(key_public, info)
    ek = _ek()
    yield "challenge", b"\x02\x00" + join(pki.der(ek), ak)
    yield "challenge-resigned", b"\x02\x80" + join(ek.tbs_certificate_bytes, ak)
    intermediate = pki.certificate(pki.TPM_INTERMEDIATE, pki.TPM_CA, ca=True)
    chained = _ek(issuer=pki.TPM_INTERMEDIATE)
    yield "challenge-chain", b"\x02\x01" + join(pki.der(chained), pki.der(intermediate), ak)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_ek = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.name(pki.TPM_CA))
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(pki.NOT_BEFORE)
        .not_valid_after(pki.NOT_AFTER)
        .sign(pki.key(pki.TPM_CA), hashes.SHA256(), ecdsa_deterministic=True)
    )
    yield "challenge-rsa-ek", b"\x02\x00" + join(pki.der(rsa_ek), ak)


def piv_seeds() -> Iterator[tuple[str, bytes]]:
    # Byte 0 (mod 2): the certificates as sent, or their to-be-signed parts re-signed.
    device = pki.key(pki.DEVICE).public_key()
    attestation = pki.certificate("attestation 9a", pki.CARD_F9, device, ca=False)
    f9 = pki.certificate(pki.CARD_F9, pki.CARD_CA, ca=True)
    yield "attested", b"\x00" + join(pki.der(attestation), pki.der(f9))
    yield (
        "attested-resigned",
        b"\x01" + join(attestation.tbs_certificate_bytes, f9.tbs_certificate_bytes),
    )
    other = pki.certificate("attestation other", pki.CARD_F9, ca=False)
    yield "other-key", b"\x00" + join(pki.der(other), pki.der(f9))


SEEDS = {
    "codec": codec_seeds,
    "connection": connection_seeds,
    "csr": csr_seeds,
    "messages": messages_seeds,
    "tpm": tpm_seeds,
    "piv": piv_seeds,
}


def main() -> None:
    """Every target's seeds, or only those of the targets named as arguments."""
    for target, seeds in SEEDS.items():
        if sys.argv[1:] and target not in sys.argv[1:]:
            continue
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for name, data in seeds():
            (directory / name).write_bytes(data)
        print(f"{target}: {len(list(directory.iterdir()))} seeds")


if __name__ == "__main__":
    main()
