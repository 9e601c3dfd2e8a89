"""The attested-enrollment messages (JSON, bytes as standard base64), parsed into typed requests.

The wire format is documented in docs/architecture.md ("Attested enrollment"); parsing is kept
here, apart from HTTP and from verification, so that every malformed field gets one clear error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.errors import MalformedRequest

MAX_FIELD_BYTES = 8192  # the largest evidence item (an EK certificate) is about 1.5 KB


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedRequest(f"the request needs a non-empty string field {name!r}")
    return value


def _bytes(payload: Mapping[str, Any], name: str) -> bytes:
    return _decode(name, _text(payload, name))


def _decode(name: str, value: str) -> bytes:
    if len(value) > MAX_FIELD_BYTES * 4 // 3 + 4:
        raise MalformedRequest(f"field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedRequest(f"field {name!r} is not standard base64") from exc


def _bytes_list(payload: Mapping[str, Any], name: str) -> tuple[bytes, ...]:
    value = payload.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MalformedRequest(f"field {name!r} must be a list of base64 strings")
    return tuple(_decode(name, item) for item in value)


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        payload = json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer of over 4,300 digits;
    # RecursionError, arrays or objects nested about a thousand deep.
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest(f"the request body is not JSON: {exc}") from exc
    if not isinstance(payload, Mapping):
        raise MalformedRequest("the request body must be a JSON object")
    return payload


@dataclass(frozen=True)
class TpmChallengeRequest:
    """Step 1 of TPM attestation: the TPM's EK certificate and a fresh attestation key (AK)."""

    device_id: str
    ek_certificate: bytes  # DER
    ek_chain: tuple[bytes, ...]  # DER intermediates, if the manufacturer uses any
    ak_public: bytes  # marshalled TPM2B_PUBLIC

    @classmethod
    def parse(cls, body: bytes) -> TpmChallengeRequest:
        payload = _json_object(body)
        return cls(
            device_id=_text(payload, "device_id"),
            ek_certificate=_bytes(payload, "ek_certificate"),
            ek_chain=_bytes_list(payload, "ek_chain"),
            ak_public=_bytes(payload, "ak_public"),
        )


@dataclass(frozen=True)
class TpmEnrollRequest:
    """Step 2: the activated credential secret, the CSR and TPM2_Certify of its key by the AK."""

    challenge_id: str
    activated_secret: bytes
    csr: bytes  # DER PKCS#10
    key_public: bytes  # marshalled TPM2B_PUBLIC of the device key
    certify_info: bytes  # marshalled TPMS_ATTEST
    certify_signature: bytes  # marshalled TPMT_SIGNATURE

    @classmethod
    def parse(cls, body: bytes) -> TpmEnrollRequest:
        payload = _json_object(body)
        return cls(
            challenge_id=_text(payload, "challenge_id"),
            activated_secret=_bytes(payload, "activated_secret"),
            csr=_bytes(payload, "csr"),
            key_public=_bytes(payload, "key_public"),
            certify_info=_bytes(payload, "certify_info"),
            certify_signature=_bytes(payload, "certify_signature"),
        )


@dataclass(frozen=True)
class PivEnrollRequest:
    """A smartcard enrollment: the CSR and the card's attestation of the key (slot 9A)."""

    csr: bytes  # DER PKCS#10, signed on the card
    attestation_certificate: bytes  # DER, made by the card for the 9A key, signed by its F9 key
    attestation_intermediate: bytes  # DER, the card's F9 certificate from its manufacturer

    @classmethod
    def parse(cls, body: bytes) -> PivEnrollRequest:
        payload = _json_object(body)
        return cls(
            csr=_bytes(payload, "csr"),
            attestation_certificate=_bytes(payload, "attestation_certificate"),
            attestation_intermediate=_bytes(payload, "attestation_intermediate"),
        )
