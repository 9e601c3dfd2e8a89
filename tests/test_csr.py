"""The EST wire format and the device CSR policy, checked as pure functions."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from enrollment.csr import check_device_csr, decode_est_body
from fleetgate.errors import CSRRejected


def _name(*common_names: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names]
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _csr_der(
    *common_names: str,
    key=None,
    algorithm=None,
    extensions: list[x509.ExtensionType] | None = None,
    organization: str | None = None,
) -> bytes:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _name(*common_names, organization=organization)
    )
    for extension in extensions or []:
        builder = builder.add_extension(extension, critical=False)
    if algorithm is None and not isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(Encoding.DER)


def _own_san(device_id: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"urn:fleetgate:device:{device_id}")]
    )


def _public_point(der: bytes) -> bytes:
    """The public point a DER CSR carries, read without any policy."""
    key = x509.load_der_x509_csr(der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


# -- decode_est_body ----------------------------------------------------------------------------


def test_decode_accepts_base64_wrapped_over_lines_with_crlf():
    der = _csr_der("sensor-1")
    b64 = base64.b64encode(der).decode()
    wrapped = "\r\n".join(b64[i : i + 64] for i in range(0, len(b64), 64)) + "\r\n"
    assert decode_est_body(wrapped.encode()) == der


def test_decode_accepts_single_line_base64():
    der = _csr_der("sensor-1")
    assert decode_est_body(base64.b64encode(der)) == der


def test_decode_accepts_a_pem_csr_and_returns_its_der():
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("sensor-1"))
        .sign(key, hashes.SHA256())
    )
    assert decode_est_body(b"\n" + csr.public_bytes(Encoding.PEM)) == csr.public_bytes(Encoding.DER)


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n\t\n"])
def test_decode_refuses_an_empty_body(body):
    with pytest.raises(CSRRejected, match="empty"):
        decode_est_body(body)


@pytest.mark.parametrize("body", [b"not base64!", b"MIIB$$$$", b"abc", b"\xff\xfe\x00"])
def test_decode_refuses_a_body_that_is_not_base64(body):
    with pytest.raises(CSRRejected, match="not base64"):
        decode_est_body(body)


def test_decode_refuses_a_pem_block_that_is_not_a_csr():
    body = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CSRRejected, match="PEM"):
        decode_est_body(body)


def test_decode_rejection_is_a_client_error():
    with pytest.raises(CSRRejected) as info:
        decode_est_body(b"")
    assert info.value.http_status == 400
    assert info.value.code == "bad_csr"


# -- check_device_csr: the good case -----------------------------------------------------------


def test_a_p256_csr_with_sha256_naming_a_valid_id_is_accepted():
    key = ec.generate_private_key(ec.SECP256R1())
    checked = check_device_csr(_csr_der("sensor-1", key=key))
    assert checked.device_id == "sensor-1"
    assert checked.public_key.public_numbers() == key.public_key().public_numbers()
    assert checked.csr.subject == _name("sensor-1")


def test_a_p256_csr_signed_with_sha384_is_accepted():
    assert check_device_csr(_csr_der("sensor-1", algorithm=hashes.SHA384())).device_id == (
        "sensor-1"
    )


def test_a_csr_requesting_exactly_its_own_uri_san_is_accepted():
    checked = check_device_csr(_csr_der("sensor-1", extensions=[_own_san("sensor-1")]))
    assert checked.device_id == "sensor-1"


def test_other_subject_attributes_beside_the_cn_do_not_change_the_device_id():
    assert check_device_csr(_csr_der("sensor-1", organization="acme")).device_id == "sensor-1"


def test_the_base64_body_of_a_good_csr_passes_both_stages():
    der = _csr_der("sensor-9")
    assert check_device_csr(decode_est_body(base64.b64encode(der))).device_id == "sensor-9"


# -- check_device_csr: keys and signatures ----------------------------------------------------


def test_an_rsa_1024_key_is_refused_naming_the_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CSRRejected, match="RSA-1024") as info:
        check_device_csr(_csr_der("sensor-1", key=key))
    assert "P-256" in info.value.message


def test_a_p384_key_is_refused_naming_the_curve():
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CSRRejected, match="secp384r1") as info:
        check_device_csr(_csr_der("sensor-1", key=key))
    assert "P-256" in info.value.message


def test_an_ed25519_key_is_refused_naming_the_key_type():
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(CSRRejected, match="Ed25519") as info:
        check_device_csr(_csr_der("sensor-1", key=key))
    assert "P-256" in info.value.message


@pytest.mark.parametrize("algorithm", [hashes.SHA224(), hashes.SHA512()])
def test_signature_hashes_other_than_sha256_and_sha384_are_refused(algorithm):
    with pytest.raises(CSRRejected, match="SHA-256 or SHA-384"):
        check_device_csr(_csr_der("sensor-1", algorithm=algorithm))


def test_a_csr_whose_signature_does_not_verify_is_refused_as_no_proof_of_possession():
    der = bytearray(_csr_der("sensor-1"))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s value; the DER stays well-formed
    tampered = bytes(der)
    assert x509.load_der_x509_csr(tampered).is_signature_valid is False
    with pytest.raises(CSRRejected, match="proof of possession"):
        check_device_csr(tampered)


def test_a_csr_carrying_another_devices_public_key_is_refused():
    """Signed by key A but holding key B: whoever sent it does not hold B's private key."""
    signer = ec.generate_private_key(ec.SECP256R1())
    victim = ec.generate_private_key(ec.SECP256R1())
    der = _csr_der("sensor-1", key=signer)
    point = PublicFormat.UncompressedPoint
    signer_point = signer.public_key().public_bytes(Encoding.X962, point)
    victim_point = victim.public_key().public_bytes(Encoding.X962, point)
    assert der.count(signer_point) == 1
    swapped = der.replace(signer_point, victim_point)
    assert _public_point(swapped) == victim_point
    with pytest.raises(CSRRejected, match="does not verify"):
        check_device_csr(swapped)


@pytest.mark.parametrize("body", [b"", b"\x30\x03\x02\x01\x00", b"garbage that is not DER"])
def test_bytes_that_are_not_a_der_csr_are_refused(body):
    with pytest.raises(CSRRejected, match="not a DER PKCS#10"):
        check_device_csr(body)


# -- check_device_csr: the subject ---------------------------------------------------------------


def test_a_csr_without_a_cn_is_refused():
    with pytest.raises(CSRRejected, match="exactly one CN"):
        check_device_csr(_csr_der(organization="acme"))


def test_a_csr_with_two_cns_is_refused():
    with pytest.raises(CSRRejected, match="exactly one CN"):
        check_device_csr(_csr_der("sensor-1", "sensor-2"))


@pytest.mark.parametrize("cn", ["sensor/1", "sensor+", "devices/#", "$SYS", "a b", ".."])
def test_a_cn_that_is_not_a_valid_device_id_is_refused_with_the_id_rule(cn):
    with pytest.raises(CSRRejected, match="not a valid device id") as info:
        check_device_csr(_csr_der(cn))
    assert "1-64 characters" in info.value.message


# -- check_device_csr: requested extensions ---------------------------------------------------


@pytest.mark.parametrize(
    "extension",
    [
        x509.BasicConstraints(ca=True, path_length=None),
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
    ],
    ids=["basicConstraints", "keyUsage", "extendedKeyUsage"],
)
def test_requesting_any_extension_but_a_san_is_refused_naming_it(extension):
    with pytest.raises(CSRRejected, match="requests extension") as info:
        check_device_csr(_csr_der("sensor-1", extensions=[extension]))
    assert extension.oid.dotted_string in info.value.message


@pytest.mark.parametrize(
    "names",
    [
        [x509.UniformResourceIdentifier("urn:fleetgate:device:sensor-2")],
        [x509.UniformResourceIdentifier("urn:fleetgate:station:sensor-1")],
        [x509.DNSName("sensor-1")],
        [
            x509.UniformResourceIdentifier("urn:fleetgate:device:sensor-1"),
            x509.DNSName("broker.example"),
        ],
        [
            x509.UniformResourceIdentifier("urn:fleetgate:device:sensor-1"),
            x509.UniformResourceIdentifier("urn:fleetgate:device:sensor-2"),
        ],
    ],
    ids=["other-device", "station-uri", "dns-only", "own-uri-plus-dns", "own-uri-plus-other"],
)
def test_a_san_naming_anything_but_exactly_the_device_itself_is_refused(names):
    der = _csr_der("sensor-1", extensions=[x509.SubjectAlternativeName(names)])
    with pytest.raises(CSRRejected, match="urn:fleetgate:device:sensor-1"):
        check_device_csr(der)


def test_a_san_request_beside_another_extension_is_still_refused():
    der = _csr_der(
        "sensor-1",
        extensions=[_own_san("sensor-1"), x509.BasicConstraints(ca=True, path_length=None)],
    )
    with pytest.raises(CSRRejected, match="basicConstraints"):
        check_device_csr(der)
