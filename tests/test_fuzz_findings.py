"""What the fuzzers found, and what writing them brought to light, one promise per bug:
malformed input is refused with the parser's own error (a 4xx with a reason, a DISCONNECT), never
an unexpected exception (a 500, a dropped connection). The inputs are replayed too
(tests/fuzz/crashes/, by test_fuzz_targets.py; those found by review are named ``review-*``);
these say in words what each one was.
"""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from fuzz import pki, tpm_objects

from broker.acl import DeviceAcl
from broker.admission import Admitted, Identity
from broker.connection import MAX_REASON_STRING, Connection
from broker.core import BrokerCore, CoreSettings
from broker.metrics import Metrics
from broker.mqtt import Connect, Decoder, Disconnect, Properties, ReasonCode, encode
from broker.mqtt._wire import write_varint
from enrollment.attestation import tpm
from enrollment.attestation.messages import TpmChallengeRequest
from enrollment.attestation.piv import verify_piv_attestation
from enrollment.attestation.trust import load_certificate
from enrollment.csr import check_device_csr, decode_est_body
from fleetgate.errors import AttestationRefused, CSRRejected, MalformedRequest

# A P-256 SubjectPublicKeyInfo whose point (x = 0, y = 0) is not on the curve.
OFF_CURVE_SPKI = bytes.fromhex(
    "3059301306072a8648ce3d020106082a8648ce3d030107034200" + "04" + "00" * 64
)


def _replace_spki(tbs: bytes, spki: bytes) -> bytes:
    """``tbs`` with the device key's SubjectPublicKeyInfo swapped for ``spki`` (same length)."""
    device = pki.spki(pki.DEVICE)
    assert device in tbs and len(device) == len(spki)
    return tbs.replace(device, spki)


def _device_csr() -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(pki.name("sensor-1"))
        .sign(pki.key(pki.DEVICE), hashes.SHA256(), ecdsa_deterministic=True)
    )


# -- CSR ---------------------------------------------------------------------------------------


def test_a_csr_whose_key_is_not_on_its_curve_is_rejected():
    info = _replace_spki(_device_csr().tbs_certrequest_bytes, OFF_CURVE_SPKI)
    with pytest.raises(CSRRejected, match="public key cannot be read"):
        check_device_csr(pki.signed(info, pki.DEVICE))


def test_a_csr_with_an_unknown_version_is_rejected():
    der = bytearray(_device_csr().public_bytes(Encoding.DER))
    version = der.index(b"\x02\x01\x00")  # INTEGER 0, the first field of the request info
    der[version + 2] = 5
    with pytest.raises(CSRRejected, match="not a DER PKCS#10"):
        check_device_csr(bytes(der))


def test_a_pem_csr_with_an_unknown_version_is_rejected():
    der = bytearray(_device_csr().public_bytes(Encoding.DER))
    der[der.index(b"\x02\x01\x00") + 2] = 32
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n%s-----END CERTIFICATE REQUEST-----\n" % (
        base64.encodebytes(bytes(der))
    )
    with pytest.raises(CSRRejected, match="the PEM body is not a valid PKCS#10 CSR"):
        decode_est_body(pem)


def test_a_csr_whose_subject_does_not_parse_is_rejected():
    info = bytearray(_device_csr().tbs_certrequest_bytes)
    name = info.index(pki.name("sensor-1").public_bytes())
    info[name + 2] = 0x2C  # the RDN SET becomes a constructed UTF8String
    with pytest.raises(CSRRejected, match="not a DER PKCS#10"):
        check_device_csr(pki.signed(bytes(info), pki.DEVICE))


def test_a_csr_signed_with_an_unknown_algorithm_is_rejected():
    der = bytearray(pki.signed(_device_csr().tbs_certrequest_bytes, pki.DEVICE))
    ecdsa_with_sha256 = der.rindex(bytes.fromhex("2a8648ce3d040302"))
    der[ecdsa_with_sha256 + 6] = 0x83  # 1.2.840.10045.4.386: UnsupportedAlgorithm
    with pytest.raises(CSRRejected, match="signed with ECDSA and SHA-256 or SHA-384"):
        check_device_csr(bytes(der))


def test_a_csr_whose_common_name_is_a_bit_string_is_rejected():
    """cryptography allows a BIT STRING only for x500UniqueIdentifier (TypeError otherwise)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(pki.name("\x00x"))
        .sign(pki.key(pki.DEVICE), hashes.SHA256(), ecdsa_deterministic=True)
    )
    info = bytearray(csr.tbs_certrequest_bytes)
    info[info.index(b"\x0c\x02\x00x")] = 0x03  # UTF8String -> BIT STRING, 0 unused bits
    with pytest.raises(CSRRejected, match="not a DER PKCS#10") as rejected:
        check_device_csr(pki.signed(bytes(info), pki.DEVICE))
    assert isinstance(rejected.value.__cause__, TypeError)


# -- attestation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 1100, b'{"device_id": ' + b"1" * 4400 + b"}"],
    ids=["nested-1100-deep", "4400-digit-integer"],
)
def test_json_the_parser_cannot_hold_is_a_malformed_request(body):
    """RecursionError and Python's 4,300-digit integer limit (a ValueError that is not a
    JSONDecodeError) escaped as 500s; both fit the 16 KiB body limit. Found by review while
    writing the messages target: libFuzzer does not build inputs that deep or long."""
    with pytest.raises(MalformedRequest, match="the request body is not JSON"):
        TpmChallengeRequest.parse(body)


def _attestation_tbs() -> bytes:
    device = pki.key(pki.DEVICE).public_key()
    return pki.certificate("attestation 9a", pki.CARD_F9, device, ca=False).tbs_certificate_bytes


def _f9() -> bytes:
    return pki.der(pki.certificate(pki.CARD_F9, pki.CARD_CA, ca=True))


def test_a_card_attesting_a_key_off_its_curve_is_refused():
    attestation = pki.signed(_replace_spki(_attestation_tbs(), OFF_CURVE_SPKI), pki.CARD_F9)
    with pytest.raises(AttestationRefused, match="key that cannot be read"):
        verify_piv_attestation(
            attestation_certificate=attestation,
            attestation_intermediate=_f9(),
            anchors=pki.card_anchors(),
            csr_key=pki.key(pki.DEVICE).public_key(),
            now=pki.NOW,
        )


def test_an_intermediate_with_an_unknown_curve_is_not_an_issuer_but_a_refusal():
    f9_tbs = pki.certificate(pki.CARD_F9, pki.CARD_CA, ca=True).tbs_certificate_bytes
    p256 = bytes.fromhex("2a8648ce3d030107")
    unknown = bytes.fromhex("2a8648ce3d03017f")  # 1.2.840.10045.3.1.127
    f9 = pki.signed(f9_tbs.replace(p256, unknown, 1), pki.CARD_CA)
    attestation = pki.signed(_attestation_tbs(), pki.CARD_F9)
    with pytest.raises(AttestationRefused, match="does not chain to a trusted manufacturer"):
        verify_piv_attestation(
            attestation_certificate=attestation,
            attestation_intermediate=f9,
            anchors=pki.card_anchors(),
            csr_key=pki.key(pki.DEVICE).public_key(),
            now=pki.NOW,
        )


@pytest.mark.parametrize("field", ["version", "issuer"])
def test_a_certificate_field_that_does_not_parse_is_refused_on_loading(field):
    """An X.509 version 41 (InvalidVersion, not a ValueError); an issuer that parses only when
    first read, in chain building."""
    tbs = bytearray(_attestation_tbs())
    if field == "version":
        tbs[tbs.index(b"\xa0\x03\x02\x01\x02") + 4] = 41
    else:
        tbs[tbs.index(pki.name(pki.CARD_F9).public_bytes()) + 2] = 0x2C  # SET -> UTF8String
    with pytest.raises(AttestationRefused, match=r"is not a DER X\.509 certificate") as refused:
        load_certificate(pki.signed(bytes(tbs), pki.CARD_F9), "card attestation certificate")
    cause = x509.InvalidVersion if field == "version" else ValueError
    assert isinstance(refused.value.__cause__, cause)


def test_a_certified_tpm_key_that_is_no_public_key_is_refused():
    """A TPM certifies what it holds, an HMAC key or (if not genuine) a point off its curve;
    the verifier refuses a key it cannot compare with the CSR's."""
    area = tpm_objects.public_area(pki.DEVICE, tpm_objects.KEY_ATTRIBUTES)
    area.publicArea.unique.ecc.x = b"\x00" * 32
    area.publicArea.unique.ecc.y = b"\x00" * 32
    key_public = bytes(area.marshal())
    info = tpm_objects.certify_info(area)
    with pytest.raises(AttestationRefused, match="not a usable public key"):
        tpm.verify_certify(
            ak_public=tpm_objects.ak_public(),
            nonce=pki.NONCE,
            key_public=key_public,
            certify_info=info,
            certify_signature=tpm_objects.ak_signature(info),
            csr_key=pki.key(pki.DEVICE).public_key(),
        )


def test_a_certified_tpm_key_with_an_unknown_name_algorithm_is_refused():
    """Its name cannot be computed (tpm2-pytss raised ValueError): refused for its name
    algorithm before the name is compared."""
    area = tpm_objects.public_area(pki.DEVICE, tpm_objects.KEY_ATTRIBUTES)
    info = tpm_objects.certify_info(area)
    area.publicArea.nameAlg = 0xC0
    with pytest.raises(AttestationRefused, match="name algorithm 0x00c0 is not SHA-256"):
        tpm.verify_certify(
            ak_public=tpm_objects.ak_public(),
            nonce=pki.NONCE,
            key_public=bytes(area.marshal()),
            certify_info=info,
            certify_signature=tpm_objects.ak_signature(info),
            csr_key=pki.key(pki.DEVICE).public_key(),
        )


# -- broker connection ---------------------------------------------------------------------------


def _connected(**connect: object) -> Connection:
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda record: None)
    conn = Connection(core, peer="test", identity=Identity("d1", 1), listener="tls", now=0.0)
    conn.receive_data(encode(Connect(client_id="d1", **connect), 5), 0.0)  # type: ignore[arg-type]
    conn.admission_done(Admitted("default", DeviceAcl(("#",), ("#",))), 0.0)
    conn.take_output()
    return conn


def _publish_to(topic: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + b"\x00"  # QoS 0, no properties
    return b"\x30" + write_varint(len(body)) + body


def _disconnect_sent(conn: Connection) -> Disconnect:
    decoder = Decoder(5)
    decoder.feed(conn.take_output())
    packet = decoder.next_packet()
    assert isinstance(packet, Disconnect)
    return packet


def test_a_topic_too_long_to_quote_in_a_reason_string_still_gets_a_disconnect():
    """The refusal quotes the topic; 17,000 control characters quote to 68,000 bytes, more than
    a reason string holds: the connection raised ValueError instead of disconnecting."""
    conn = _connected()
    conn.receive_data(_publish_to(("\x01" * 17_000 + "+").encode()), 1.0)
    disconnect = _disconnect_sent(conn)
    assert disconnect.reason_code == ReasonCode.TOPIC_NAME_INVALID
    reason = disconnect.properties.reason_string
    assert reason is not None and len(reason) == MAX_REASON_STRING
    assert conn.closing


def test_a_disconnect_reason_that_would_exceed_the_clients_maximum_packet_size_is_left_out():
    conn = _connected(properties=Properties(maximum_packet_size=64))
    conn.receive_data(_publish_to(b"+" * 40), 1.0)
    assert _disconnect_sent(conn) == Disconnect(reason_code=ReasonCode.TOPIC_NAME_INVALID)
