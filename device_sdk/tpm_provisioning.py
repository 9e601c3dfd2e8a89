"""Attested enrollment of a TPM-held device key over fleetgate's EST extension.

Two round trips (``docs/architecture.md``, "TPM attestation"): the station (or, for a key
rotation, the device itself) sends the EK certificate and a fresh attestation key (AK) to
``fleetgate/tpm/challenge``; the server answers a nonce and a secret wrapped to the EK for the
AK's name. The TPM unwraps the secret (ActivateCredential) and certifies the new device key with
the AK over the nonce (Certify); ``fleetgate/tpm/enroll`` gets the secret, the Certify
statement, the key's public area and the CSR signed in the TPM, and answers the certificate.
The key store switches to key and certificate only then, as in :mod:`device_sdk.provisioning`.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sdk.errors import EnrollmentError
from device_sdk.est import device_csr
from device_sdk.provisioning import est_session, install_issued, station_context
from device_sdk.tls import trusting_context
from device_sdk.tpm import Tpm, TpmPrivateKey

if TYPE_CHECKING:
    from device_sdk.tpm_keystore import TpmKeyStore

__all__ = ["CHALLENGE", "ENROLL", "enroll_tpm", "rotate_tpm_key"]

CHALLENGE = "fleetgate/tpm/challenge"
ENROLL = "fleetgate/tpm/enroll"


def enroll_tpm(
    keystore: TpmKeyStore,
    device_id: str,
    *,
    est_url: str,
    station_cert: Path,
    station_key: Path,
    ek_chain: Sequence[x509.Certificate] = (),
    timeout: float = 30.0,
    timings: dict[str, float] | None = None,
) -> x509.Certificate:
    """First certificate for a new key in the device's TPM, attested, as station ``station_cert``.

    ``ek_chain``: the certificates between the EK certificate and the manufacturer's root, if
    the service's trust store holds only the root; kept in the store for later key rotations.
    ``timings``, if given, receives the seconds spent in each step.
    """
    context = station_context(keystore, station_cert, station_key)
    cert = _attested_enroll(keystore, device_id, est_url, context, ek_chain, timeout, timings)
    keystore.set_ek_chain(ek_chain)
    return cert


def rotate_tpm_key(
    keystore: TpmKeyStore, device_id: str, *, est_url: str, timeout: float = 30.0
) -> x509.Certificate:
    """A new TPM key, attested again, authenticated by the device's current certificate."""
    context = trusting_context(keystore)
    keystore.load_identity(context)
    return _attested_enroll(
        keystore, device_id, est_url, context, keystore.ek_chain(), timeout, None
    )


def _attested_enroll(
    keystore: TpmKeyStore,
    device_id: str,
    est_url: str,
    context: ssl.SSLContext,
    ek_chain: Sequence[x509.Certificate],
    timeout: float,
    timings: dict[str, float] | None,
) -> x509.Certificate:
    steps = timings if timings is not None else {}
    with (
        Tpm(keystore.tcti) as tpm,
        est_session(
            est_url,
            context,
            refused=f"enroll TPM device {device_id}",
            trust=keystore.trust_anchors_path,
            timeout=timeout,
        ) as est,
    ):
        with _timed(steps, "keygen"):
            endorsement = tpm.endorsement()
            key = tpm.create_device_key()
            ak = tpm.create_attestation_key()
        with _timed(steps, "challenge"):
            ca_certs = est.cacerts()
            challenge = est.attestation_json(
                CHALLENGE,
                {
                    "device_id": device_id,
                    "ek_certificate": _b64(endorsement.certificate),
                    "ek_chain": [_b64(c.public_bytes(Encoding.DER)) for c in ek_chain],
                    "ak_public": _b64(ak.public),
                },
            )
        with tpm.loaded(ak, key) as (ak_handle, key_handle):
            with _timed(steps, "activation"):
                secret = tpm.activate_credential(
                    ak_handle,
                    endorsement,
                    _field(challenge, "credential_blob"),
                    _field(challenge, "encrypted_secret"),
                )
            with _timed(steps, "certify"):
                certification = tpm.certify(key_handle, ak_handle, _field(challenge, "nonce"))
            with _timed(steps, "csr"):
                csr = device_csr(device_id, tpm.signer(key_handle))
        with _timed(steps, "issue"):
            cert = est.attested_enroll(
                ENROLL,
                {
                    "challenge_id": challenge.get("challenge_id"),
                    "activated_secret": _b64(secret),
                    "csr": _b64(csr.public_bytes(Encoding.DER)),
                    "key_public": _b64(key.public),
                    "certify_info": _b64(certification.info),
                    "certify_signature": _b64(certification.signature),
                },
            )
    install_issued(keystore, TpmPrivateKey(key, keystore.tcti), cert, ca_certs, device_id=device_id)
    return cert


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def _field(answer: dict[str, Any], name: str) -> bytes:
    value = answer.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError(f"it is {type(value).__name__}")
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise EnrollmentError(
            f"the challenge's {name!r} is not standard base64 ({exc}): is the EST server a "
            "fleetgate enrollment service with TPM attestation?"
        ) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
